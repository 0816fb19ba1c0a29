import random

import pytest
import torch

import data
from model import (GPT, CheckpointError, load_checkpoint, load_model, mask_response, mdlm_loss, save_checkpoint,
                   uninterrupted)
from conftest import tiny_config


def test_attention_is_bidirectional(tiny_model):
    x = torch.randint(0, 100, (1, data.PROMPT_LEN + data.GEN_LEN))
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % 100  # change only the last token
    assert not torch.allclose(tiny_model(x)[0, 0], tiny_model(y)[0, 0])  # the first position sees it


def test_a_narrow_canvas_keeps_the_response_positions(tiny_model, enc):
    seen = []
    hook = tiny_model.wpe.register_forward_hook(lambda module, inputs, out: seen.append(inputs[0]))
    for x0 in data.get_batch(enc, 8, random.Random(0)):  # math rows on 48 columns, code rows on 80
        tiny_model(x0)
    hook.remove()
    for x0, pos in zip(data.get_batch(enc, 8, random.Random(0)), seen):
        assert pos.tolist() == list(range(tiny_model.config.block_size - x0.shape[1], tiny_model.config.block_size))


def test_prompt_is_never_masked(enc):
    x0 = data.get_batch(enc, 16, random.Random(0))[0]
    P = x0.shape[1] - data.GEN_LEN
    xt, masked = mask_response(x0, P, torch.ones(len(x0)), enc.mask)
    assert (xt[:, :P] == x0[:, :P]).all()
    assert (xt[:, P:] == enc.mask).all()  # t=1: every response token masked


def test_mask_token_is_never_predicted(tiny_model):
    logits = tiny_model(torch.randint(0, 100, (2, data.PROMPT_LEN + data.GEN_LEN)))
    assert torch.isneginf(logits[..., tiny_model.config.mask_id]).all()


def test_loss_counts_only_masked_response_positions(tiny_model, enc):
    x0 = data.get_batch(enc, 4, random.Random(0))[1]  # 1 code row, the widest canvas
    torch.manual_seed(0)
    loss, logits, t, masked = mdlm_loss(tiny_model, x0, data.PROMPT_LEN, enc.mask)
    assert not masked[:, :data.PROMPT_LEN].any() and masked.any()
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x0, reduction="none")
    assert torch.allclose(loss, ce[masked].mean())
    torch.manual_seed(0)
    elbo, _, t, masked = mdlm_loss(tiny_model, x0, data.PROMPT_LEN, enc.mask, elbo_weight=True)
    assert torch.allclose(elbo, (ce * masked / t[:, None]).sum() / (len(x0) * data.GEN_LEN))


def test_tiny_model_overfits_a_handful_of_examples(enc):
    from sample import FixedSchedule, generate
    torch.manual_seed(0)
    rng = random.Random(0)
    problems = [data.sample_problem("math", "train", rng) for _ in range(4)]
    prompts = data.encode_prompts(enc, [p.prompt for p in problems])
    x0 = torch.cat([prompts, torch.tensor([data.encode_response(enc, p.responses[0]) for p in problems])], dim=1)
    model = GPT(tiny_config(enc, n_embd=64))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(600):
        loss = mdlm_loss(model, x0, prompts.shape[1], enc.mask)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    out, _ = generate(model.eval(), prompts, FixedSchedule(data.GEN_LEN))
    assert (out == x0).all()


def test_checkpoint_round_trips(tmp_path, tiny_model, enc):
    path = str(tmp_path / "ckpt.pt")
    state = {f"_orig_mod.{k}": v for k, v in tiny_model.state_dict().items()}  # as saved from a compiled model
    save_checkpoint(path, model=state, model_args=vars(tiny_model.config), tokenizer_id=data.tokenizer_id(enc),
                    iter=7, best_val=0.5)
    model, ckpt = load_model(path, data.tokenizer_id(enc))
    assert ckpt["iter"] == 7
    for (k, a), b in zip(tiny_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k


def test_missing_checkpoint_names_the_file_and_the_command(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt does not exist.*python train_base.py"):
        load_checkpoint(str(tmp_path / "nope.pt"), made_by="python train_base.py")


def saved_tiny(tmp_path, model, enc, **changes):
    path = str(tmp_path / "base.pt")
    state = dict(model=model.state_dict(), model_args=vars(model.config).copy(), tokenizer_id=data.tokenizer_id(enc))
    for k, v in changes.items():
        state[k] = v
    save_checkpoint(path, **state)
    return path


def test_checkpoint_from_another_tokenizer_is_refused(tmp_path, tiny_model, enc):
    path = saved_tiny(tmp_path, tiny_model, enc, tokenizer_id="0123456789abcdef")
    with pytest.raises(CheckpointError, match="base.pt was trained with tokenizer 0123456789abcdef"):
        load_model(path, data.tokenizer_id(enc))


def test_checkpoint_from_another_config_is_refused(tmp_path, tiny_model, enc):
    args = dict(vars(tiny_model.config), n_embd=48)
    path = saved_tiny(tmp_path, tiny_model, enc, model_args=args)
    with pytest.raises(CheckpointError, match="base.pt does not match GPT"):
        load_model(path, data.tokenizer_id(enc))


def test_truncated_checkpoint_is_refused(tmp_path, tiny_model, enc):
    path = saved_tiny(tmp_path, tiny_model, enc)
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[:len(blob) // 2])
    with pytest.raises(CheckpointError, match="base.pt is not a readable checkpoint"):
        load_model(path)


class RunsCode:
    def __reduce__(self):
        import os
        return (os.system, ("touch pwned_by_pickle",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    import pickle
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"model": RunsCode()}, path, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="evil.pt is not a readable checkpoint"):
        load_checkpoint(str(path))
    assert not (tmp_path / "pwned_by_pickle").exists()


def test_a_crash_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, model={"w": torch.ones(2)}, iter=1)

    def crash(obj, f, *a, **k):
        open(f, "wb").write(b"half a chec")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, model={"w": torch.zeros(2)}, iter=2)
    monkeypatch.undo()
    assert load_checkpoint(path)["iter"] == 1


def test_compiled_training_step_compiles_once_per_canvas_width(enc):
    import torch._dynamo
    graphs = []

    def counting_backend(gm, example_inputs):  # one call per traced graph
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(tiny_config(enc))
    compiled = torch.compile(model, backend=counting_backend, dynamic=False)  # as train_base.py does on CUDA
    rng = random.Random(0)
    for _ in range(3):  # fresh batches, masks and t every step: each task's shape stays the same
        for x0 in data.get_batch(enc, 8, rng):
            mdlm_loss(compiled, x0, x0.shape[1] - data.GEN_LEN, enc.mask)[0].backward()
    assert len(graphs) == len(data.PROMPT_WIDTHS)


def test_a_signal_during_an_uninterrupted_block_is_raised_when_it_ends():
    import os
    import signal
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # as the training scripts set it
    finished = False
    try:
        with pytest.raises(KeyboardInterrupt):
            with uninterrupted():
                os.kill(os.getpid(), signal.SIGTERM)
                finished = True  # the block (an optimizer step) runs to its end first
        assert finished and signal.getsignal(signal.SIGTERM) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_an_empty_checkpoint_file_is_refused_in_one_line(tmp_path):
    path = tmp_path / "e.pt"
    path.write_bytes(b"")  # : > e.pt
    with pytest.raises(CheckpointError, match=r"e.pt is not a readable checkpoint \(EOFError\)"):
        load_checkpoint(str(path))


def test_two_writers_never_share_a_temporary_file(tmp_path, monkeypatch):
    """A second save runs while the first is half written (two runs with the same --out):
    each writes its own temporary file, and the last rename wins whole."""
    import io
    path, real_save, started = str(tmp_path / "ckpt.pt"), torch.save, []

    def interleaved(obj, f, *a, **k):
        blob = io.BytesIO()
        real_save(obj, blob)
        with open(f, "wb") as out:
            out.write(blob.getvalue()[:100])
            if not started:  # the other writer, start to finish, in the middle of this write
                started.append(f)
                save_checkpoint(path, model={"w": torch.zeros(2)}, iter=2)
            out.write(blob.getvalue()[100:])
    monkeypatch.setattr(torch, "save", interleaved)
    save_checkpoint(path, model={"w": torch.ones(2)}, iter=1)
    monkeypatch.undo()
    assert load_checkpoint(path)["iter"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_only_regular_files_are_written(tmp_path):
    import os
    import stat
    fifo, directory = str(tmp_path / "fifo.pt"), str(tmp_path / "dir.pt")
    os.mkfifo(fifo)
    os.mkdir(directory)
    for path in (fifo, directory):  # as root, a device node would be replaced the same way
        with pytest.raises(CheckpointError, match="not a regular file"):
            save_checkpoint(path, model={"w": torch.ones(2)})
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and os.path.isdir(directory)


def test_non_finite_weights_are_never_saved(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, model={"w": torch.ones(2)}, iter=1)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(CheckpointError, match=r"not saving .*ckpt.pt: model\['w'\] holds non-finite values"):
            save_checkpoint(path, model={"w": torch.tensor([1.0, bad])}, iter=2)
    assert load_checkpoint(path)["iter"] == 1


def test_an_output_path_that_would_destroy_something_is_refused(tmp_path, tiny_model, enc):
    from model import check_output_path
    base = saved_tiny(tmp_path, tiny_model, enc)
    other = tmp_path / "notes.txt"
    other.write_text("mine")
    refusals = [(("", "mdlm"), {}, "empty"),
                ((base, "head"), {"inputs": {"--base": base}}, "is this run's --base"),
                ((base, "head"), {"replace": True}, "holds a mdlm checkpoint; this run writes a head checkpoint"),
                ((base, "mdlm"), {}, "already holds a trained mdlm checkpoint"),
                ((str(other), "mdlm"), {}, "already holds a file that is not a checkpoint"),
                ((str(other / "x.pt"), "mdlm"), {}, "is not a directory")]
    for args, kwargs, message in refusals:
        with pytest.raises(CheckpointError, match=message):
            check_output_path(*args, **kwargs)
    check_output_path(base, "mdlm", replace=True)  # --resume or --overwrite
    check_output_path(str(tmp_path / "new" / "head.pt"), "head")
    assert other.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["base.pt", "new", "notes.txt"]
