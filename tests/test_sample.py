import os
import re
import signal

import pytest
import torch

import data
from corrector import CorrectionHead, HeadConfig
from remasking import HeadRemask, LoopSchedule, NoRemask, RandomRemask, ReMDMConf, ReMDMLoop
from proseco import ProSeCoCorrector
from sample import (BLOCK_LEN, ConfidenceThreshold, FixedSchedule, Rollback, decode_problems, end_answers, generate,
                    generate_fast)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CountingModel(torch.nn.Module):
    """Wraps a model, counts its forward passes and keeps every canvas it was given."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.calls, self.inputs = model, model.config, 0, []

    def forward(self, x, **kwargs):
        self.calls += 1
        self.inputs.append(x.clone())
        return self.model(x, **kwargs)


class Scripted(torch.nn.Module):
    """A stand-in model: every position predicts token_of_row[b] with probability sure_of_row[b]."""

    def __init__(self, config, token_of_row, sure_of_row):
        super().__init__()
        self.config, self.calls = config, 0
        V = config.vocab_size
        probs = torch.stack([torch.full((V,), (1 - s) / (V - 2)) for s in sure_of_row])
        probs[torch.arange(len(token_of_row)), token_of_row] = torch.tensor(sure_of_row)
        probs[:, config.mask_id] = 0
        self.logits = probs.log()

    def forward(self, x, return_hidden=False):
        self.calls += 1
        logits = self.logits[:, None, :].expand(x.shape[0], x.shape[1], -1)
        return (logits, torch.zeros(*x.shape, 4)) if return_hidden else logits


def prompts(enc, n=3, task="math"):
    return data.encode_prompts(enc, [p.prompt for p in data.fixed_problems(task, "test", n)])


def tiny_head(model, **kw):
    torch.manual_seed(0)
    return CorrectionHead(HeadConfig(n_embd_in=model.config.n_embd, width=16)).eval()


def policies(model, n_rows):
    return {"none": NoRemask(), "head": HeadRemask(tiny_head(model), tau=0.0, check_every=1),
            "random": RandomRemask(torch.full((64, n_rows), 3)), "remdm-conf": ReMDMConf(eta=4.0),
            "remdm-loop": ReMDMLoop(eta=0.5)}


# ReMDM-loop waits for a block 90% revealed, which rollback at 4 tokens/step never leaves it: not a pair
RULES_AND_POLICIES = [(rule, policy) for rule in (FixedSchedule(8), ConfidenceThreshold(0.5), Rollback(4))
                      for policy in ("none", "head", "random", "remdm-conf", "remdm-loop")
                      if not (isinstance(rule, Rollback) and policy == "remdm-loop")]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("rule,policy", RULES_AND_POLICIES + [(FixedSchedule(8), "proseco"),
                                                              (ConfidenceThreshold(0.5), "proseco")], ids=str)
def test_the_fast_decoder_gives_the_reference_decoders_tokens_and_passes(tiny_model, enc, rule, policy, temperature):
    p = prompts(enc, 4, task="code")
    if policy == "remdm-loop" and isinstance(rule, FixedSchedule):
        rule = LoopSchedule(rule)

    def decode(generate_fn):
        how = {"corrector": ProSeCoCorrector(max_passes=2)} if policy == "proseco" else {
            "policy": policies(tiny_model, len(p))[policy]}
        return generate_fn(tiny_model, p, rule, eos_id=enc.eos, temperature=temperature,
                           generator=torch.Generator().manual_seed(0), **how)
    reference, fast = decode(generate), decode(lambda *a, **k: generate_fast(*a, compile=False, **k))
    assert torch.equal(fast[0], reference[0]) and torch.equal(fast[1], reference[1])


@pytest.mark.parametrize("steps,block_len", [(32, 32), (8, 32), (5, 32), (1, 32), (8, 8), (8, BLOCK_LEN)])
def test_fixed_schedule_takes_exactly_steps_passes_per_row_and_fills_every_mask(tiny_model, enc, steps, block_len):
    model, p = CountingModel(tiny_model), prompts(enc)
    out, passes = generate(model, p, FixedSchedule(steps), block_len=block_len)
    assert passes.tolist() == [steps] * len(p) and model.calls == steps
    assert not (out == enc.mask).any()
    assert torch.equal(out[:, :p.shape[1]], p)  # the prompt is never changed


def test_fixed_schedule_reveals_the_scheduled_count_per_step(tiny_model, enc):
    masks_left = []
    generate_fast(tiny_model, prompts(enc), FixedSchedule(5), block_len=32,
                  on_step=lambda before, x, back, active: masks_left.append((x == enc.mask).sum(1).tolist()))
    revealed = [data.GEN_LEN - masks_left[0][0]] + [a[0] - b[0] for a, b in zip(masks_left, masks_left[1:])]
    assert revealed == [7, 7, 6, 6, 6]  # 32 tokens spread evenly over 5 steps
    assert all(len(set(row)) == 1 for row in masks_left)  # every row on the same schedule


def test_blocks_fill_left_to_right(tiny_model, enc):
    states, p = [], prompts(enc)
    generate_fast(tiny_model, p, FixedSchedule(8), block_len=8,
                  on_step=lambda before, x, back, active: states.append(x.clone()))
    P = p.shape[1]
    assert (states[1][:, P + 8:] == enc.mask).all()  # after block 1's two steps, the rest untouched
    assert not (states[1][:, P:P + 8] == enc.mask).any()


def test_threshold_reveals_every_masked_token_above_it_and_at_least_the_surest():
    confidence = torch.tensor([[0.95, 0.5, 0.91, 0.99], [0.2, 0.3, 0.1, 0.4]])
    masked = torch.tensor([[True, True, True, False], [True, True, True, False]])
    owed, steps_left = masked.sum(1), torch.tensor(5)
    revealed = ConfidenceThreshold(0.9).reveal(confidence, masked, owed, steps_left)
    assert revealed.tolist() == [[True, False, True, False],  # both masked tokens above 0.9; never a revealed one
                                 [False, True, False, False]]  # none above: the single most confident
    assert ConfidenceThreshold(0.9).reveal(confidence, masked, owed, torch.tensor(1)).tolist() == masked.tolist()


def test_threshold_decoding_reveals_at_least_one_token_per_step_in_the_current_block(tiny_model, enc):
    p, steps = prompts(enc), []
    generate_fast(tiny_model, p, ConfidenceThreshold(0.99),
                  on_step=lambda before, x, back, active: steps.append((before, x)))
    P = p.shape[1]
    for before, x in steps:
        newly = (before == enc.mask) & (x != enc.mask)
        still = (before[:, P:] == enc.mask).any(1)
        assert (newly.sum(1)[still] >= 1).all()
        block = newly[:, P:].nonzero()[:, 1] // BLOCK_LEN  # all of a step's reveals in one block
        assert len(set(block.tolist())) <= 1


def test_passes_are_counted_per_row_and_a_finished_row_costs_nothing_more(tiny_model, enc):
    # row 0 is sure its answer is empty: one pass reveals its block as EOS and the row is done;
    # row 1 is never sure of anything: one token per pass, 16 passes per block
    model = Scripted(tiny_model.config, token_of_row=[enc.eos, 7], sure_of_row=[0.999, 0.01])
    out, passes = generate(model, prompts(enc, 2), ConfidenceThreshold(0.9), eos_id=enc.eos)
    assert passes.tolist() == [1, data.GEN_LEN] and model.calls == data.GEN_LEN
    assert (out[0, -data.GEN_LEN:] == enc.eos).all() and not (out == enc.mask).any()
    out, passes = generate(model, prompts(enc, 2), FixedSchedule(8), eos_id=enc.eos)
    assert passes.tolist() == [1, 8]  # the hard budget is a ceiling per row, not a cost for rows that ended


def test_an_ended_answer_is_filled_with_eos_and_an_unfinished_one_is_not(enc):
    m, e = enc.mask, enc.eos
    x = torch.tensor([[e, 5, 6, e, m, m], [e, 5, m, e, m, m]])  # prompt: the first two columns
    assert end_answers(x, 2, m, e).tolist() == [[e, 5, 6, e, e, e], [e, 5, m, e, m, m]]


@pytest.mark.parametrize("rule", [FixedSchedule(8), ConfidenceThreshold(0.5)])
@pytest.mark.parametrize("policy", ["head", "random", "remdm-conf", "remdm-loop"])
def test_a_policy_never_sends_back_a_prompt_token_or_a_mask(tiny_model, enc, rule, policy):
    p = prompts(enc, 4, task="code")
    policy = {"head": lambda: HeadRemask(tiny_head(tiny_model), tau=0.0, check_every=1),
              "random": lambda: RandomRemask(torch.full((64, len(p)), 3)),
              "remdm-conf": lambda: ReMDMConf(eta=4.0), "remdm-loop": lambda: ReMDMLoop(eta=0.5)}[policy]()
    if isinstance(policy, ReMDMLoop) and isinstance(rule, FixedSchedule):
        rule = LoopSchedule(rule)  # its time grid: a block mostly revealed early, where the loop acts
    sent = []
    out, _ = generate_fast(tiny_model, p, rule, policy=policy, generator=torch.Generator().manual_seed(0),
                           on_step=lambda before, x, back, active: sent.append((before, back)))
    assert sum(back.sum().item() for _, back in sent) > 0  # the policy did act
    for before, back in sent:
        assert not back[:, :p.shape[1]].any() and not (back & (before == enc.mask)).any()
    assert not (out == enc.mask).any()


class SendBackOne(NoRemask):
    """A stand-in policy: at every step, the leftmost revealed token of each row in `rows`."""

    def __init__(self, rows):
        self.rows = torch.tensor(rows)

    def send_back(self, state, revealed, hidden, block, steps_left, generator=None):
        first = revealed & (revealed.cumsum(1) == 1)
        return first & self.rows[:, None], state


def test_a_send_back_at_a_blocks_last_step_costs_that_row_one_refill_pass_and_nothing_else(tiny_model, enc):
    sent = []
    out, passes = generate_fast(tiny_model, prompts(enc, 2, "code"), FixedSchedule(8),
                                policy=SendBackOne([True, False]),
                                on_step=lambda before, x, back, active: sent.append(back[0].sum().item()))
    # blocks of 16 at 4 steps each; the policy acts at each block's last step (3 and 8), so row 0 gets a
    # refill step after each (4 and 9), at which nothing is sent back
    assert sent == [0, 1, 1, 1, 0, 1, 1, 1, 1, 0], "a block's last step was not judged, or its refill step was"
    assert passes.tolist() == [10, 8], "a row paid for a refill it did not need, or got one free"
    assert not (out == enc.mask).any()


def test_at_8_tokens_per_step_the_head_reviews_the_second_block_before_it_is_final(tiny_model, enc):
    p, sent = prompts(enc, 2, "code"), torch.zeros(2, dtype=torch.long)

    def count(before, x, back, active):
        sent.add_(back[:, -BLOCK_LEN:].sum(1))
    generate_fast(tiny_model, p, FixedSchedule(4), policy=HeadRemask(tiny_head(tiny_model), tau=0.0), on_step=count)
    assert (sent > 0).all(), "block 2 was final before the head could judge it"


def test_remdm_loops_time_grid_holds_a_block_at_alpha_on_and_refills_what_went_back(tiny_model, enc):
    held, sent = [], []

    def record(before, x, back, active):
        held.append((x[0, -data.GEN_LEN:][:BLOCK_LEN] == enc.mask).sum().item())
        sent.append(back[0].sum().item())
    generate_fast(tiny_model, prompts(enc, 1, "code"), LoopSchedule(FixedSchedule(8)), policy=ReMDMLoop(eta=0.3),
                  generator=torch.Generator().manual_seed(0), on_step=record)
    # 4 steps per block of 16: time 1 -> 0.75 reveals to 0.5 of alpha_on's rise, then alpha_on = 0.9 holds
    # ceil(1.6) = 2 masks through the loop (or what went back, which waits for the next step), then the
    # last step reveals the rest
    assert held[:4] == [8, 2, max(2, sent[2]), 0], f"the block's masks after each step: {held[:4]}"
    assert sent[2] > 0, "nothing went back in the loop: the test proves little"


def test_remdm_loop_sends_back_nothing_before_a_block_reaches_alpha_on():
    policy = ReMDMLoop(eta=1.0)  # every candidate goes back once the loop runs
    block, revealed = torch.ones(16, dtype=torch.bool), torch.zeros(2, 16, dtype=torch.bool)
    revealed[0, :13], revealed[1, :14] = True, True  # 3 masks left (not yet looping), 2 (looping)
    back, _ = policy.send_back(policy.start(revealed), revealed, None, block, torch.tensor(2))
    assert back.sum(1).tolist() == [0, 14], f"the loop runs from ceil(16 * 0.1) = 2 masks on, got {back.sum(1)}"


def test_remdm_conf_spends_the_schedules_budget_least_confident_first():
    rows = 4000
    block = torch.ones(16, dtype=torch.bool)
    revealed = torch.zeros(rows, 16, dtype=torch.bool)
    revealed[:, :8] = True  # half the block revealed: t = 0.5; with 2 steps left s = 0.25, sigma_max = 0.5
    policy = ReMDMConf(eta=1.0)
    confidence = torch.full((rows, 16), 0.9, dtype=torch.float64)
    confidence[:, 0] = 0.1  # one token revealed with little confidence
    state = policy.after_reveal(policy.start(revealed), revealed, confidence)
    back, _ = policy.send_back(state, revealed, None, block, torch.tensor(2), torch.Generator().manual_seed(0))
    assert abs(back.sum(1).float().mean().item() - 0.5) < 0.05, "not sigma_max tokens per step in expectation"
    assert back[:, 0].float().mean() > 2 * back[:, 1].float().mean(), "the least confident token is not likeliest"
    last, _ = policy.send_back(state, revealed, None, block, torch.tensor(1))
    assert not last.any(), "sent back at a block's last step, where the schedule leaves no mask (s = 0)"


@pytest.mark.parametrize("policy", [ReMDMConf(eta=1e4), ReMDMLoop(eta=1.0)])  # every candidate goes back
def test_remdm_sends_back_only_tokens_of_the_current_block(policy):
    block, revealed = torch.arange(20) >= 4, torch.ones(1, 20, dtype=torch.bool)
    revealed[0, 18:] = False  # an earlier block (0-3) and the current one, 2 masks left: ReMDM-loop's loop runs
    state = policy.after_reveal(policy.start(revealed), revealed, torch.full((1, 20), 0.5, dtype=torch.float64))
    back, _ = policy.send_back(state, revealed, None, block, torch.tensor(2), torch.Generator().manual_seed(0))
    assert back[0, 4:].any(), "nothing went back: the test proves little"
    assert not back[0, :4].any(), "a token of a finished block went back"


def test_the_head_checks_a_row_once_per_check_every_tokens_revealed(tiny_model, enc):
    trace = []
    generate_fast(tiny_model, prompts(enc, 2, "code"), FixedSchedule(32),
                  policy=HeadRemask(tiny_head(tiny_model), tau=0.0, max_per_check=1, check_every=4),
                  on_step=lambda before, x, b, active: trace.append(
                      (((before == enc.mask) & (x != enc.mask))[0].sum().item(), b[0].any().item())))
    checks = [i for i, (_, sent) in enumerate(trace) if sent]
    assert checks[0] == 4  # one token per step: 4 revealed, then the first check
    for a, b in zip(checks, checks[1:]):
        assert sum(n for n, _ in trace[a:b]) >= 4  # at least 4 revealed between two checks
    assert len(checks) >= 5  # and it keeps checking: tau=0 flags every revealed token


def test_rollback_keeps_k_per_step_so_send_backs_add_passes(tiny_model, enc):
    p = prompts(enc, 2, "code")
    plain, passes = generate(tiny_model, p, Rollback(4))
    assert passes.tolist() == [8, 8] and torch.equal(plain, generate(tiny_model, p, FixedSchedule(8))[0])
    back = []
    out, passes = generate_fast(tiny_model, p, Rollback(4), policy=HeadRemask(tiny_head(tiny_model), tau=0.0),
                                on_step=lambda before, x, b, active: back.append(b.sum().item()))
    assert sum(back) > 0 and (passes > 8).all() and not (out == enc.mask).any()
    assert (passes <= 2 * 8 + 2).all(), "more than twice the steps, plus one refill per block"


def test_a_position_is_sent_back_at_most_max_per_position_times(tiny_model, enc):
    sent = torch.zeros(2, prompts(enc, 2, "code").shape[1] + data.GEN_LEN, dtype=torch.long)

    def count(before, x, back, active):
        sent.add_(back.long())
    generate_fast(tiny_model, prompts(enc, 2, "code"), ConfidenceThreshold(0.5), on_step=count,
                  policy=HeadRemask(tiny_head(tiny_model), tau=0.0, check_every=1, max_per_position=1))
    assert sent.max() == 1


@pytest.mark.parametrize("rule", [FixedSchedule(8), ConfidenceThreshold(0.7)])
@pytest.mark.parametrize("with_head", [False, True])
def test_greedy_answer_of_a_prompt_does_not_depend_on_its_batch(tiny_model, enc, rule, with_head):
    remask = HeadRemask(tiny_head(tiny_model), tau=0.3) if with_head else NoRemask()
    p = prompts(enc, 6)
    together, passes = generate(tiny_model, p, rule, policy=remask, eos_id=enc.eos)
    for i in (0, 5):
        alone, n = generate(tiny_model, p[i:i + 1], rule, policy=remask, eos_id=enc.eos)
        assert torch.equal(alone[0], together[i]) and n.item() == passes[i].item()


def test_problems_are_decoded_in_blocks_by_default(tiny_model, enc):
    states = []
    decode_problems(tiny_model, enc, data.fixed_problems("math", "test", 3), FixedSchedule(8),
                    on_step=lambda before, x, back, active: states.append(x[:, -data.GEN_LEN:].clone()))
    assert (states[8 * BLOCK_LEN // data.GEN_LEN - 1][:, -BLOCK_LEN:] == enc.mask).all()


def test_temperature_sampling_is_reproducible_with_a_seed(tiny_model, enc):
    runs = [generate(tiny_model, prompts(enc), FixedSchedule(8), temperature=1.0,
                     generator=torch.Generator().manual_seed(5))[0] for _ in range(2)]
    assert torch.equal(*runs)


@pytest.mark.parametrize("rule,block_len,message", [
    (FixedSchedule(0), 16, "--steps must be between 1 and 32"), (FixedSchedule(33), 16, "--steps must be between"),
    (FixedSchedule(3), 16, "a multiple of the number of blocks"), (FixedSchedule(8), 5, "--block-len must divide"),
    (FixedSchedule(8), 0, "--block-len must divide")], ids=str)
def test_bad_steps_or_block_length_are_refused_naming_the_flag(tiny_model, enc, rule, block_len, message):
    with pytest.raises(ValueError, match=message):
        generate(tiny_model, prompts(enc), rule, block_len=block_len)


@pytest.mark.parametrize("rule", [FixedSchedule(8), ConfidenceThreshold(0.9)])
@pytest.mark.parametrize("with_head", [False, True])
def test_compiled_decoding_step_compiles_once_for_every_step_and_call(tiny_model, enc, rule, with_head):
    import torch._dynamo

    remask = HeadRemask(tiny_head(tiny_model), tau=0.0) if with_head else NoRemask()
    graphs = []

    def counting_backend(gm, example_inputs):  # what torch.compile hands a backend: one traced graph
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    generate_fast(tiny_model, prompts(enc), rule, policy=remask, eos_id=enc.eos, compile=counting_backend)
    first = len(graphs)
    generate_fast(tiny_model, prompts(enc), rule, policy=remask, eos_id=enc.eos, compile=counting_backend)  # again
    other_rule = FixedSchedule(4) if isinstance(rule, FixedSchedule) else ConfidenceThreshold(0.5)
    other_remask = HeadRemask(remask.head, tau=0.7) if with_head else remask
    generate_fast(tiny_model, prompts(enc), other_rule, policy=other_remask, eos_id=enc.eos,
                  compile=counting_backend)  # another budget or threshold, another tau
    assert first == 1 and len(graphs) == 1  # one graph, no graph break, no recompilation


# the command line


@pytest.fixture
def ckpt(tmp_path, tiny_model, enc):
    from common import save_checkpoint
    path = str(tmp_path / "base.pt")
    save_checkpoint(path, model=tiny_model.state_dict(), model_args=vars(tiny_model.config),
                    tokenizer_id=data.tokenizer_id(enc))
    return path


@pytest.fixture
def head_ckpt(tmp_path, tiny_model, enc):
    from common import model_fingerprint, save_checkpoint
    head = tiny_head(tiny_model)
    path = str(tmp_path / "head.pt")
    save_checkpoint(path, model=head.state_dict(), model_args=vars(head.config), base_fingerprint=model_fingerprint(
        tiny_model), tokenizer_id=data.tokenizer_id(enc), remasking=HeadRemask(head, tau=0.0).settings())
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
    (["--steps", "0"], "--steps must be between 1 and 32"),
    (["--steps", "-3"], "--steps must be between 1 and 32"),
    (["--steps", "64"], "--steps must be between 1 and 32"),
    (["--steps", "8", "--block-len", "5"], "--block-len must divide the generation length 32, got 5"),
    (["--block-len", "0"], "--block-len must divide the generation length 32, got 0"),
    (["--threshold", "1.5"], "--threshold must be in (0, 1]"),
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt", "1+" * 40], "longer than the 48 the model reads"),
])
def test_cli_bad_input_is_one_clear_line(ckpt, argv, message):
    error = run_cli("--ckpt", ckpt, "--no-head", "--num", "1", *argv)
    assert error.startswith("error: ") and message in error and "\n" not in error


@pytest.mark.parametrize("argv", [["--steps", "4", "--threshold", "0.9"], ["--threshold", "nan"], ["--num", "-1"],
                                  ["--temperature", "-1"], ["--temperature", "inf"]])
def test_cli_refuses_bad_flags_with_a_usage_error(ckpt, argv):
    assert run_cli("--ckpt", ckpt, "--no-head", *argv) == "2"  # argparse: usage, one error line, exit 2


@pytest.mark.parametrize("rule", [["--steps", "4"], ["--threshold", "0.9"], ["--rollback", "4"]])
@pytest.mark.parametrize("head", [True, False])
def test_cli_runs_every_rule_with_and_without_the_head(ckpt, head_ckpt, capsys, rule, head):
    assert run_cli("--ckpt", ckpt, "--head", head_ckpt, *([] if head else ["--no-head"]), "--num", "1", "--show",
                   *rule) is None
    out = capsys.readouterr().out
    assert "accuracy" in out and ("using the correction head" in out) == head


def test_cli_show_prints_the_token_a_step_sent_back(ckpt, head_ckpt, capsys):
    run_cli("--ckpt", ckpt, "--head", head_ckpt, "--num", "1", "--task", "math", "--show", "--steps", "8")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    shown = [token for line in lines for token in re.findall(r"\[([^\]]*)\]", line)]
    assert shown and "_" not in shown  # tau=0: the head sends back at every check, and we see what it sent back


def test_cli_decodes_any_text_prompt(ckpt, capsys):
    assert run_cli("--ckpt", ckpt, "--no-head", "--prompt", "héllo → 数学 🙂\\n", "--steps", "4") is None
    assert "héllo → 数学 🙂" in capsys.readouterr().out


def test_same_seed_prints_the_same_text(ckpt, capsys):
    outputs = []
    for _ in range(2):
        run_cli("--ckpt", ckpt, "--no-head", "--num", "2", "--temperature", "1.0", "--seed", "3")
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and "accuracy" in outputs[0]


def test_the_shipped_weights_load_and_still_solve_the_tasks(enc):
    # a change to the tokenizer, the prompt layout or the model that would break the weights in
    # weights/ fails here, not on a new user's first `python sample.py`
    import os

    from corrector import load_head
    from common import load_model, model_fingerprint
    from cli import SHIPPED
    base, _ = load_model(os.path.join(SHIPPED, "base.pt"), data.tokenizer_id(enc))
    head, ckpt = load_head(os.path.join(SHIPPED, "head.pt"), model_fingerprint(base))
    for task in data.TASKS:
        problems = data.fixed_problems(task, "test", 20)
        responses, _ = decode_problems(base, enc, problems, ConfidenceThreshold(0.9),
                                       policy=HeadRemask(head, **ckpt["remasking"]))
        assert sum(data.score(problems, responses)) >= 14  # most of them: the weights still work


def test_the_shipped_autoregressive_twin_loads_and_still_solves_the_tasks(enc):
    import os

    import autoregressive
    from cli import SHIPPED
    model, _ = autoregressive.load_ar(os.path.join(SHIPPED, "ar.pt"), data.tokenizer_id(enc))
    for task in data.TASKS:
        problems = data.fixed_problems(task, "test", 20)
        responses, _ = autoregressive.decode_problems(model, enc, problems)
        assert sum(data.score(problems, responses)) >= 18


# what the adversarial probe found: bad heads, seeds and interruptions end in one line


def head_with(head_ckpt, tmp_path, **changes):
    """A copy of the head checkpoint with its remasking settings changed (...: removed)."""
    state = torch.load(head_ckpt, weights_only=True)
    state["remasking"] = {**state["remasking"], **changes}
    for key in [k for k, v in changes.items() if v is ...]:
        del state["remasking"][key]
    path = str(tmp_path / "changed_head.pt")
    torch.save(state, path)
    return path


@pytest.mark.parametrize("changes,message", [({"tau": ...}, "tau missing or unknown"),
                                             ({"bogus": 1}, "bogus missing or unknown"),
                                             ({"tau": float("nan")}, "tau must be a number from 0 to 1, got nan"),
                                             ({"check_every": 0}, "check_every must be a whole number, at least 1")])
def test_cli_a_head_whose_remasking_settings_cannot_work_is_one_clear_line(ckpt, head_ckpt, tmp_path, changes,
                                                                          message):
    error = run_cli("--ckpt", ckpt, "--head", head_with(head_ckpt, tmp_path, **changes), "--num", "1")
    assert error.startswith("error: ") and message in error and "\n" not in error, error


def test_cli_refuses_a_seed_torch_cannot_take_with_a_usage_error(ckpt):
    assert run_cli("--ckpt", ckpt, "--no-head", "--seed", str(2 ** 64)) == "2"


def test_cli_skips_a_shipped_head_trained_on_another_base_with_a_note(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no out/head.pt here: the default is the shipped weights/head.pt
    assert run_cli("--ckpt", ckpt, "--num", "1") is None
    captured = capsys.readouterr()
    assert "skipping" in captured.err and "weights/head.pt" in captured.err and "python train_head.py" in captured.err
    assert "using the correction head" not in captured.out


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_while_the_cli_starts_exits_130_without_a_traceback(signum):
    import subprocess
    import sys
    import time
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "sample.py"), "--num", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # torch is still importing
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, (proc.returncode, err)


@pytest.mark.parametrize("rule", [ConfidenceThreshold(0.9), FixedSchedule(8), Rollback(4)])
def test_the_random_control_matches_the_heads_send_backs_in_every_row_that_decodes_as_long(enc, rule):
    """The shipped base and head on validation problems, where rows progress differently:
    the control replays each row's counts at that row's own steps, so a row sends back
    exactly what the head's row did unless its answer ended in fewer steps."""
    from common import load_model, model_fingerprint
    from remasking import head_policy, per_row_counts
    base, _ = load_model(os.path.join(ROOT, "weights", "base.pt"), data.tokenizer_id(enc))
    p = data.encode_prompts(enc, [q.prompt for q in data.fixed_problems("math", "val", 64)])

    def decode(policy):
        sent, active = [], []

        def record(before, x, back, working):
            sent.append(back.sum(1))
            active.append(working)
        generate_fast(base, p, rule, policy=policy, eos_id=enc.eos, on_step=record,
                      generator=torch.Generator().manual_seed(0))
        return torch.stack(sent), torch.stack(active)
    head_sent, head_active = decode(head_policy(os.path.join(ROOT, "weights", "head.pt"), model_fingerprint(base)))
    random_sent, random_active = decode(RandomRemask(per_row_counts(head_sent, head_active)))
    as_long = random_active.sum(0) >= head_active.sum(0)
    assert head_sent.sum() > 0 and as_long.sum() > 32, "too few send-backs or rows: the test proves little"
    assert torch.equal(random_sent.sum(0)[as_long], head_sent.sum(0)[as_long]), "a row's control sent back more/less"
