"""ProSeCo (proseco.py): its training loss as released, and its sampler in the authors' order."""

import pytest
import torch

from proseco import ProSeCoCorrector, proseco_loss
from sample import FixedSchedule, generate, generate_fast
from test_sample import CountingModel, prompts


class Knows(torch.nn.Module):
    """A stand-in model that predicts x0 shifted by `shift` at every position, whatever
    its input (shift 0: always right), and records its inputs."""

    def __init__(self, x0, shift):
        super().__init__()
        self.x0, self.shift, self.inputs = x0, shift, []

    def forward(self, x):
        self.inputs.append(x.clone())
        return 50.0 * torch.nn.functional.one_hot(self.x0 + self.shift, 1000).float()


def test_proseco_loss_a_right_corrector_input_costs_minus_p_not_log_p():
    torch.manual_seed(0)
    x0 = torch.randint(0, 999, (8, 12))
    loss = proseco_loss(Knows(x0, 0), x0, 4, mask_id=999)
    # the masked term is ~0; each right token costs -p(x0)/t = -1/t with t in [0.1, 1): -log p would give ~0
    assert -10 < loss.item() < -1


@pytest.mark.parametrize("corrector_input", ["all", "masked"])
def test_proseco_loss_corrector_input_shows_the_argmax_where_chosen(corrector_input):
    torch.manual_seed(0)
    x0 = torch.randint(0, 998, (8, 12))
    model = Knows(x0, 1)  # its argmax is always wrong: x0 + 1
    proseco_loss(model, x0, 4, mask_id=999, corrector_input=corrector_input)
    xt, y = model.inputs
    response = torch.arange(12) >= 4
    masked = xt == 999
    shown = response.expand_as(x0) if corrector_input == "all" else masked
    assert masked.any() and (~masked & response).any()
    assert torch.equal(y[shown], x0[shown] + 1) and torch.equal(y[~shown], x0[~shown])


# ProSeCo's sampler (proseco.py) on the shared decoder


class Climbs(torch.nn.Module):
    """A stand-in model whose argmax is input + 1 (never the mask), capped at `top` if
    given: the corrector's y climbs one a pass, with no fixed point unless capped.
    Records its calls and inputs."""

    def __init__(self, config, top=None):
        super().__init__()
        self.config, self.top, self.calls, self.inputs = config, top, 0, []

    def forward(self, x, return_hidden=False):
        self.calls += 1
        self.inputs.append(x.clone())
        up = (x + 1) % (self.config.vocab_size - 1) if self.top is None else (x + 1).clamp(max=self.top)
        logits = torch.nn.functional.one_hot(up, self.config.vocab_size).float()
        return (logits, logits) if return_hidden else logits


def test_proseco_makes_a_predictor_pass_on_the_masked_canvas_before_every_reveal(tiny_model, enc):
    model = CountingModel(tiny_model)
    before_steps = []
    out, passes = generate_fast(model, prompts(enc), FixedSchedule(8), corrector=ProSeCoCorrector(max_passes=2),
                                on_step=lambda before, x, back, active: before_steps.append(before))
    predictor_inputs = [x for x in model.inputs if (x == enc.mask).any()]
    assert len(predictor_inputs) == 8  # one per step: corrector passes see no masks
    for before, seen in zip(before_steps, predictor_inputs):
        assert torch.equal(before, seen)  # each step reveals from a fresh pass on its own canvas


def test_proseco_corrector_input_keeps_the_committed_tokens(enc, tiny_model):
    model = Climbs(tiny_model.config)
    p = prompts(enc)
    generate(model, p, FixedSchedule(4), block_len=32, corrector=ProSeCoCorrector(max_passes=1))
    predictor, corrector = model.inputs[2], model.inputs[3]  # step 2: its predictor pass, then its corrector pass
    committed = predictor != enc.mask
    assert torch.equal(corrector[committed], predictor[committed])
    assert not (corrector == enc.mask).any()  # masks are filled with the predictor's argmax


def test_proseco_reports_every_forward_pass_and_stops_at_s_without_a_fixed_point(enc, tiny_model):
    model = Climbs(tiny_model.config)
    corrector = ProSeCoCorrector(max_passes=2)
    out, passes = generate(model, prompts(enc), FixedSchedule(4), block_len=32, corrector=corrector)
    assert passes.tolist() == [4 + 4 * 2] * 3 == [model.calls] * 3  # 4 predictor passes, 4 loops of S=2
    assert [(x == enc.mask).any().item() for x in model.inputs].count(False) == 4 * 2  # corrector inputs hold no mask
    assert not (out == enc.mask).any()


def test_proseco_loop_stops_each_row_at_its_fixed_point_and_returns_its_passes(tiny_model):
    model = Climbs(tiny_model.config, top=10)
    x = torch.tensor([[7, 7, 7], [9, 9, 9]])  # nothing masked: y starts as x
    logits = model(x)
    *_, passes = ProSeCoCorrector(max_passes=20)(model, x, logits, logits, torch.ones(3, dtype=torch.bool),
                                                 torch.ones(2, dtype=torch.bool))
    assert passes.tolist() == [4, 2]  # 7 -> 8 -> 9 -> 10, then a pass that changes nothing; 9 -> 10, then one
