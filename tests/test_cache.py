"""
The KV cache (model.KVCache). The AR twin's is exact (tests/test_autoregressive.py
shows its tokens equal the uncached decoder's). The diffusion decoder's is Fast-dLLM's
approximation: a block's first step feeds the whole canvas and fills the cache, its
later steps feed a window and read the rest from the cache.
"""

import pytest
import torch

import data
from model import KVCache
from proseco import ProSeCoCorrector
from remasking import HeadRemask, LoopSchedule, NoRemask
from sample import BLOCK_LEN, CACHES, ConfidenceThreshold, FixedSchedule, generate_fast
from test_sample import (RULES_AND_POLICIES, CountingModel, ckpt, policies, prompts, run_cli,  # noqa: F401
                         tiny_head)  # ckpt: a fixture


def canvas(enc, n=3):
    p = prompts(enc, n, task="code")
    x = torch.cat([p, torch.full((n, data.GEN_LEN), enc.mask)], dim=1)
    x[:, -data.GEN_LEN:-BLOCK_LEN] = torch.randint(0, 100, (n, data.GEN_LEN - BLOCK_LEN))  # block 1 written
    return x


def test_a_window_fed_after_a_whole_canvas_pass_gets_that_pass_outputs(tiny_model, enc):
    x = canvas(enc)
    full, full_hidden = tiny_model(x, return_hidden=True)
    cache, lo = KVCache(x.shape[1]), x.shape[1] - BLOCK_LEN
    tiny_model(x, cache=cache)
    window, window_hidden = tiny_model(x[:, lo:], return_hidden=True, cache=cache, start=lo)
    assert torch.allclose(window, full[:, lo:], atol=1e-5) and torch.allclose(window_hidden, full_hidden[:, lo:],
                                                                              atol=1e-5)


def test_a_windowed_pass_reads_the_columns_outside_it_from_the_cache_not_the_canvas(tiny_model, enc):
    x = canvas(enc)
    cache, lo = KVCache(x.shape[1]), x.shape[1] - BLOCK_LEN
    tiny_model(x, cache=cache)
    before = tiny_model(x[:, lo:], cache=cache, start=lo)
    y = x.clone()
    y[:, lo - 5] = (x[:, lo - 5] + 1) % 100  # a cached column changes on the canvas only
    assert torch.equal(tiny_model(y[:, lo:], cache=cache, start=lo), before)
    assert not torch.allclose(tiny_model(y)[:, lo:], before)  # a whole pass sees it: the cache is stale


@pytest.mark.parametrize("cache", CACHES)
def test_a_blocks_first_step_feeds_the_whole_canvas_and_its_later_steps_only_the_window(tiny_model, enc, cache):
    model, p = CountingModel(tiny_model), prompts(enc, 2, task="code")
    generate_fast(model, p, FixedSchedule(8), cache=cache)  # two blocks of four steps
    W, after_block_1 = p.shape[1] + data.GEN_LEN, BLOCK_LEN if cache == "dual" else data.GEN_LEN
    assert [x.shape[1] for x in model.inputs] == [W] + 3 * [after_block_1] + [W] + 3 * [BLOCK_LEN]


class RecordHidden(NoRemask):
    """A stand-in policy: keeps the hidden states each step hands it, sends nothing back."""

    def __init__(self):
        self.seen = []

    def send_back(self, state, revealed, hidden, block, steps_left, generator=None):
        self.seen.append(hidden.clone())
        return torch.zeros_like(revealed), state


def test_with_a_cache_a_policy_reads_the_columns_not_fed_as_the_blocks_first_step_computed_them(tiny_model, enc):
    p, policy, canvases = prompts(enc, 2, task="code"), RecordHidden(), []
    generate_fast(tiny_model, p, FixedSchedule(8), policy=policy, cache="dual",
                  on_step=lambda before, x, back, active: canvases.append(before))
    first = tiny_model(canvases[0], return_hidden=True)[1]  # block 1's first step: the whole canvas
    P, outside = p.shape[1], torch.ones(canvases[0].shape[1], dtype=torch.bool)
    outside[P:P + BLOCK_LEN] = False  # the second step feeds block 1 alone
    assert torch.allclose(policy.seen[1][:, outside], first[:, outside], atol=1e-6)


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("rule,policy", RULES_AND_POLICIES, ids=str)
def test_with_a_cache_every_rule_and_policy_fills_the_canvas_and_sends_back_only_in_the_current_block(
        tiny_model, enc, cache, rule, policy):
    p = prompts(enc, 4, task="code")
    remask = policies(tiny_model, len(p))[policy]
    if policy == "remdm-loop" and isinstance(rule, FixedSchedule):
        rule = LoopSchedule(rule)  # its time grid: a block mostly revealed early, where the loop acts
    steps = []
    out, passes = generate_fast(tiny_model, p, rule, policy=remask, cache=cache,
                                generator=torch.Generator().manual_seed(0),
                                on_step=lambda before, x, back, active: steps.append((before, x, back)))
    assert not (out == enc.mask).any() and (passes > 0).all()
    P = p.shape[1]
    for before, x, back in steps:  # the current block: the first one that still had masks
        first_mask = (before[:, P:] == enc.mask).float().argmax(1)
        block_start = P + first_mask // BLOCK_LEN * BLOCK_LEN
        column = torch.arange(before.shape[1])
        earlier = column < block_start[:, None]
        assert not (back & (earlier | (column >= block_start[:, None] + BLOCK_LEN))).any()
        assert torch.equal(x[earlier], before[earlier])  # a finished block is final
    if policy != "none":
        assert sum(back.sum().item() for _, _, back in steps) > 0  # the policy did act


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("rule", [FixedSchedule(8), ConfidenceThreshold(0.7)], ids=str)
@pytest.mark.parametrize("with_head", [False, True])
def test_with_a_cache_an_answer_does_not_depend_on_its_batch(tiny_model, enc, cache, rule, with_head):
    remask = HeadRemask(tiny_head(tiny_model), tau=0.3) if with_head else NoRemask()
    p = prompts(enc, 6)
    together, passes = generate_fast(tiny_model, p, rule, policy=remask, eos_id=enc.eos, cache=cache)
    for i in (0, 5):
        alone, n = generate_fast(tiny_model, p[i:i + 1], rule, policy=remask, eos_id=enc.eos, cache=cache)
        assert torch.equal(alone[0], together[i]) and n.item() == passes[i].item()


def test_a_cache_is_refused_for_prosecos_corrector_and_an_unknown_one_by_name(tiny_model, enc):
    with pytest.raises(ValueError, match="without a cache"):
        generate_fast(tiny_model, prompts(enc), FixedSchedule(8), corrector=ProSeCoCorrector(), cache="prefix")
    with pytest.raises(ValueError, match="cache must be None or one of prefix, dual"):
        generate_fast(tiny_model, prompts(enc), FixedSchedule(8), cache="suffix")


@pytest.mark.parametrize("cache", CACHES)
def test_the_cached_decoding_step_compiles_once_per_window_and_not_again(tiny_model, enc, cache):
    import torch._dynamo

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    remask = HeadRemask(tiny_head(tiny_model), tau=0.5)
    generate_fast(tiny_model, prompts(enc), FixedSchedule(8), policy=remask, eos_id=enc.eos, cache=cache,
                  compile=counting_backend)
    first = len(graphs)
    generate_fast(tiny_model, prompts(enc), FixedSchedule(4), policy=remask, eos_id=enc.eos, cache=cache,
                  compile=counting_backend)
    # per block at most two: its whole-canvas first step and its window (each block's own columns), none per step
    assert first <= 2 * data.GEN_LEN // BLOCK_LEN and len(graphs) == first


@pytest.mark.parametrize("cache", CACHES)
def test_cli_decodes_with_each_cache(ckpt, capsys, cache):
    assert run_cli("--ckpt", ckpt, "--no-head", "--num", "1", "--threshold", "0.9", "--cache", cache) is None
    assert "accuracy" in capsys.readouterr().out
