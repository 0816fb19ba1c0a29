import pytest
import torch

import data
from sample import BLOCK_LEN, decode_problems, generate


class CountingModel(torch.nn.Module):
    """Wraps a model and counts its forward passes."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.calls = model, model.config, 0

    def forward(self, x, **kwargs):
        self.calls += 1
        return self.model(x, **kwargs)


def prompts(enc, n=3):
    return data.encode_prompts(enc, [p.prompt for p in data.fixed_problems("math", "test", n)])


@pytest.mark.parametrize("steps,block_len", [(32, None), (8, None), (5, None), (1, None), (8, 8)])
def test_exactly_steps_forward_passes_and_no_mask_left(tiny_model, enc, steps, block_len):
    model, p = CountingModel(tiny_model), prompts(enc)
    out, passes = generate(model, p, data.GEN_LEN, steps, block_len=block_len)
    assert passes == model.calls == steps
    assert not (out == enc.mask).any()
    assert torch.equal(out[:, :p.shape[1]], p)  # the prompt is never changed


def test_reveals_the_scheduled_count_per_step(tiny_model, enc):
    masks_left = []
    generate(tiny_model, prompts(enc), data.GEN_LEN, 5,
             on_step=lambda s, x, back: masks_left.append((x == enc.mask).sum(1).tolist()))
    revealed = [data.GEN_LEN - masks_left[0][0]] + [a[0] - b[0] for a, b in zip(masks_left, masks_left[1:])]
    assert revealed == [7, 7, 6, 6, 6]  # 32 tokens spread evenly over 5 steps
    assert all(len(set(row)) == 1 for row in masks_left)  # every row on the same schedule


def test_blocks_fill_left_to_right(tiny_model, enc):
    states = []
    p = prompts(enc)
    generate(tiny_model, p, data.GEN_LEN, 8, block_len=8, on_step=lambda s, x, back: states.append(x.clone()))
    P = p.shape[1]
    assert (states[1][:, P + 8:P + 16] == enc.mask).all()  # after block 1's two steps, block 2 untouched
    assert not (states[1][:, P:P + 8] == enc.mask).any()


def test_problems_are_decoded_in_blocks_by_default(tiny_model, enc):
    states = []
    decode_problems(tiny_model, enc, data.fixed_problems("math", "test", 3), 8,
                    on_step=lambda s, x, back: states.append(x[:, -data.GEN_LEN:].clone()))
    steps_in_last_block = 8 * BLOCK_LEN // data.GEN_LEN
    before_last_block = states[8 - steps_in_last_block - 1]
    assert (before_last_block[:, -BLOCK_LEN:] == enc.mask).all()  # fails if decoding ignores the blocks


def test_temperature_sampling_is_reproducible_with_a_seed(tiny_model, enc):
    runs = [generate(tiny_model, prompts(enc), data.GEN_LEN, 8, temperature=1.0,
                     generator=torch.Generator().manual_seed(5))[0] for _ in range(2)]
    assert torch.equal(*runs)


@pytest.mark.parametrize("steps,block_len", [(0, None), (-1, None), (33, None), (8, 5), (6, 8)])
def test_bad_steps_or_block_length_are_refused(tiny_model, enc, steps, block_len):
    with pytest.raises(ValueError):
        generate(tiny_model, prompts(enc), data.GEN_LEN, steps, block_len=block_len)


@pytest.fixture
def ckpt(tmp_path, tiny_model, enc):
    from model import save_checkpoint
    path = str(tmp_path / "base.pt")
    save_checkpoint(path, model=tiny_model.state_dict(), model_args=vars(tiny_model.config),
                    tokenizer_id=data.tokenizer_id(enc))
    return path


def run_cli(*argv):
    """sample.py's exit message, or None if it ran to the end."""
    from sample import main
    try:
        main(list(argv))
    except SystemExit as e:
        return str(e.code)


def test_cli_names_a_missing_checkpoint_and_the_command_that_makes_it(tmp_path):
    assert run_cli("--ckpt", str(tmp_path / "base.pt")) == \
        f"error: {tmp_path / 'base.pt'} does not exist; run `python train_base.py` to make it"


@pytest.mark.parametrize("argv,message", [
    (["--steps", "0"], "--steps must be between 1 and the generation length 32, got 0"),
    (["--steps", "-3"], "--steps must be between 1 and the generation length 32, got -3"),
    (["--steps", "64"], "--steps must be between 1 and the generation length 32, got 64"),
    (["--steps", "8", "--block-len", "5"], "the block length (5) must divide the generation length"),
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt", "1+" * 40], "longer than the 48 the model reads"),
])
def test_cli_bad_input_is_one_clear_line(ckpt, argv, message):
    error = run_cli("--ckpt", ckpt, "--no-head", "--num", "1", *argv)
    assert error.startswith("error: ") and message in error and "\n" not in error


def test_cli_decodes_any_text_prompt(ckpt, capsys):
    assert run_cli("--ckpt", ckpt, "--no-head", "--prompt", "héllo → 数学 🙂\\n", "--steps", "4") is None
    assert "héllo → 数学 🙂" in capsys.readouterr().out


def test_same_seed_prints_the_same_text(ckpt, capsys):
    outputs = []
    for _ in range(2):
        run_cli("--ckpt", ckpt, "--no-head", "--num", "2", "--temperature", "1.0", "--seed", "3")
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and "accuracy" in outputs[0]


class NeverSettles(torch.nn.Module):
    """A stand-in model whose argmax is always (input + 1): it has no fixed point."""

    def __init__(self, config):
        super().__init__()
        self.config, self.calls = config, 0

    def forward(self, x, return_hidden=False):
        self.calls += 1
        logits = torch.nn.functional.one_hot((x + 1) % (self.config.vocab_size - 1), self.config.vocab_size).float()
        return (logits, logits) if return_hidden else logits


def half_revealed(tiny_model, enc):
    x, _ = generate(tiny_model, prompts(enc), data.GEN_LEN, 4)
    x[:, -data.GEN_LEN::2] = enc.mask  # every other response token masked again
    return x, tiny_model(x)


def test_corrector_loop_stops_at_a_fixed_point_and_writes_back_only_revealed_tokens(tiny_model, enc):
    from sample import correct
    x, logits = half_revealed(tiny_model, enc)
    is_response = torch.arange(x.shape[1]) >= x.shape[1] - data.GEN_LEN
    model = CountingModel(tiny_model)
    out, (last_logits, _), passes = correct(model, x, logits, is_response, max_steps=20)
    assert passes == model.calls < 20  # it settled before the limit
    revealed = (x != enc.mask) & is_response
    assert torch.equal(last_logits.argmax(-1)[revealed], out[revealed])  # a fixed point: one more pass changes nothing
    assert torch.equal(out[~revealed], x[~revealed])  # masks and prompt untouched


def test_corrector_loop_without_a_fixed_point_stops_after_S_passes(tiny_model, enc):
    from sample import correct
    x, logits = half_revealed(tiny_model, enc)
    model = NeverSettles(tiny_model.config)
    _, _, passes = correct(model, x, logits, torch.arange(x.shape[1]) >= x.shape[1] - data.GEN_LEN, max_steps=3)
    assert passes == model.calls == 3


def test_proseco_sampling_reports_every_forward_pass(enc, tiny_model):
    model = NeverSettles(tiny_model.config)  # every corrector loop runs its full S passes
    out, passes = generate(model, prompts(enc), data.GEN_LEN, 4, corrector_steps=2)
    assert passes == model.calls == 4 + 3 * 2 - 3  # 4 steps, 3 loops of 2; each loop's last pass serves the next step
    assert not (out == enc.mask).any()


@pytest.mark.parametrize("with_head", [False, True])
def test_compiled_decoding_step_compiles_once_for_every_step_and_call(tiny_model, enc, with_head):
    import torch._dynamo

    from corrector import CorrectionHead, HeadConfig

    head = CorrectionHead(HeadConfig(n_embd_in=32, width=16, tau=0.0)).eval() if with_head else None
    graphs = []

    def counting_backend(gm, example_inputs):  # what torch.compile hands a backend: one traced graph
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    generate(tiny_model, prompts(enc), data.GEN_LEN, 8, head=head, compile=counting_backend)
    first = len(graphs)
    generate(tiny_model, prompts(enc), data.GEN_LEN, 8, head=head, compile=counting_backend)  # again, same shapes
    generate(tiny_model, prompts(enc), data.GEN_LEN, 4, head=head, compile=counting_backend)  # another budget
    assert first == 1 and len(graphs) == 1  # one graph, no graph break, no recompilation


def test_review_passes_reveal_no_new_token(tiny_model, enc):
    masks_left = []
    _, passes = generate(tiny_model, prompts(enc), data.GEN_LEN, 8, review=2,
                         on_step=lambda s, x, back: masks_left.append((x == enc.mask).sum().item()))
    assert passes == 8 and masks_left[5] == 0  # every token is out after pass 6 of 8; 7 and 8 only refill
    assert masks_left[4] > 0
