import pytest
import torch

import data
from common import CheckpointError, load_checkpoint, load_model, save_checkpoint, uninterrupted


def saved_tiny(tmp_path, model, enc, **changes):
    path = str(tmp_path / "base.pt")
    state = dict(model=model.state_dict(), model_args=vars(model.config).copy(), tokenizer_id=data.tokenizer_id(enc))
    for k, v in changes.items():
        state[k] = v
    save_checkpoint(path, **state)
    return path


class RunsCode:
    def __reduce__(self):
        import os
        return (os.system, ("touch pwned_by_pickle",))


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


def test_checkpoint_from_another_tokenizer_is_refused(tmp_path, tiny_model, enc):
    path = saved_tiny(tmp_path, tiny_model, enc, tokenizer_id="0123456789abcdef")
    with pytest.raises(CheckpointError, match="base.pt was trained with tokenizer 0123456789abcdef"):
        load_model(path, data.tokenizer_id(enc))


def test_checkpoint_from_another_config_is_refused(tmp_path, tiny_model, enc):
    args = dict(vars(tiny_model.config), n_embd=48)
    path = saved_tiny(tmp_path, tiny_model, enc, model_args=args)
    with pytest.raises(CheckpointError, match="base.pt does not match Transformer"):
        load_model(path, data.tokenizer_id(enc))


def test_truncated_checkpoint_is_refused(tmp_path, tiny_model, enc):
    path = saved_tiny(tmp_path, tiny_model, enc)
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[:len(blob) // 2])
    with pytest.raises(CheckpointError, match="base.pt is not a readable checkpoint"):
        load_model(path)


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
    from common import check_output_path
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


# what the adversarial probe found: checkpoints that do not fit end in one line, before any allocation


def test_a_checkpoint_whose_config_is_not_a_dict_is_refused(tmp_path, tiny_model, enc):
    path = saved_tiny(tmp_path, tiny_model, enc, config="mdlm")
    with pytest.raises(CheckpointError, match="base.pt is not a checkpoint of this project: its config is not a dict"):
        load_model(path)


def test_a_checkpoint_whose_heads_do_not_divide_its_width_is_refused(tmp_path, tiny_model, enc):
    path = saved_tiny(tmp_path, tiny_model, enc, model_args=dict(vars(tiny_model.config), n_head=5))
    with pytest.raises(CheckpointError, match="width 32 is not a multiple of the 5 attention heads"):
        load_model(path)


def test_a_checkpoint_whose_config_is_far_larger_than_its_weights_is_refused_before_building_it(tmp_path, tiny_model,
                                                                                                 enc):
    # a width of 600,000 would take terabytes to build: the count of parameters says no first
    path = saved_tiny(tmp_path, tiny_model, enc, model_args=dict(vars(tiny_model.config), n_embd=600_000, n_head=2))
    with pytest.raises(CheckpointError, match=r"its model_args make [\d,]+ parameters, its weights hold"):
        load_model(path)


@pytest.mark.parametrize("label", [None, "mdlm"])
def test_an_ar_checkpoint_is_known_by_its_causal_weights_whatever_its_label_says(tmp_path, enc, label):
    import dataclasses
    from conftest import tiny_config
    from model import Transformer
    causal = Transformer(dataclasses.replace(tiny_config(enc), causal=True))
    path = saved_tiny(tmp_path, causal, enc, **({"config": {"objective": label}} if label else {}))
    with pytest.raises(CheckpointError, match="holds an ar checkpoint|its model is causal"):
        load_model(path, data.tokenizer_id(enc))  # a diffusion decoder's load


def test_the_temporary_file_a_killed_save_left_is_removed_by_the_next_save(tmp_path):
    import os
    path = str(tmp_path / "ckpt.pt")
    stale = tmp_path / f"ckpt.pt.{2 ** 22 + 1}.0123abcd.tmp"  # a pid above Linux's largest: its writer is gone
    stale.write_bytes(b"x" * 1000)
    save_checkpoint(path, model={"w": torch.ones(2)}, iter=1)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"], "a dead writer's temporary file outlived the next save"


def test_the_temporary_file_of_a_live_writer_is_left_alone(tmp_path):
    import os
    live = tmp_path / f"ckpt.pt.{os.getppid()}.0123abcd.tmp"  # our parent runs: it may be mid-save
    live.write_bytes(b"x")
    save_checkpoint(str(tmp_path / "ckpt.pt"), model={"w": torch.ones(2)}, iter=1)
    assert live.exists(), "a save removed another live writer's temporary file"


@pytest.mark.parametrize("name", ["report.pt", "report"])
def test_a_report_goes_only_to_a_file_named_for_it(tmp_path, name):
    from cli import check_report_path
    with pytest.raises(ValueError, match="a .json report goes to a file whose name ends .json"):
        check_report_path(str(tmp_path / name), ".json")


def test_a_report_never_replaces_a_checkpoint_whatever_its_name(tmp_path, tiny_model, enc):
    import shutil
    from cli import check_report_path
    checkpoint = saved_tiny(tmp_path, tiny_model, enc)
    for suffix in (".json", ".png"):
        shutil.copy(checkpoint, tmp_path / f"named{suffix}")
        with pytest.raises(ValueError, match=f"holds something other than a {suffix} report"):
            check_report_path(str(tmp_path / f"named{suffix}"), suffix)
    (tmp_path / "old.json").write_text('{"rows": []}')
    check_report_path(str(tmp_path / "old.json"), ".json")  # an earlier report: replaced, as asked


def test_a_checkpoint_naming_an_objective_this_project_does_not_train_is_refused(tmp_path, tiny_model, enc):
    path = saved_tiny(tmp_path, tiny_model, enc, config={"objective": 5})
    with pytest.raises(CheckpointError, match="names an objective this project does not train"):
        load_model(path)
