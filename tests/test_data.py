import itertools
import random
import re
from functools import lru_cache

import pytest
import torch

import data


def test_tokenizer_round_trips_any_text(enc):
    texts = ["(3+4)*7=3+4=7,7*7=49", "def f(xs):\n    return [x*3 for x in xs]\n",
             "héllo ünïcode → 数学 🙂\t\r\n  x"]
    for text in texts:
        assert enc.decode(enc.encode_ordinary(text)) == text


def test_digits_are_single_tokens(enc):
    pieces = [enc.decode([t]) for t in enc.encode_ordinary("123+4567=5690, x*10")]
    assert all(len(p) == 1 for p in pieces if any(c.isdigit() for c in p))


def test_vocabulary_is_small_with_eos_and_mask(enc):
    assert enc.n_vocab < 1000
    assert enc.decode([enc.eos]) == data.EOS and enc.decode([enc.mask]) == data.MASK
    assert enc.mask == enc.n_vocab - 1  # the model's mask_id


def test_problems_have_several_valid_responses():
    rng = random.Random(0)
    for task in data.TASKS:  # all but degenerate draws (3+3+3 has one worked solution)
        several = [len(set(data.sample_problem(task, "train", rng).responses)) >= 2 for _ in range(200)]
        assert sum(several) >= 0.95 * len(several)


def test_every_math_prompt_has_valid_responses_of_different_lengths(enc):
    rng = random.Random(5)  # where the answer sits depends on the layout: what parallel decoding mixes up
    for _ in range(200):
        p = data.sample_problem("math", "train", rng)
        assert len({len(enc.encode_ordinary(r)) for r in p.responses}) >= 2, p.prompt


def test_math_verifier_accepts_every_reference_and_rejects_wrong_answers():
    rng = random.Random(1)
    for _ in range(50):
        p = data.sample_problem("math", "test", rng)
        assert all(data.math_correct(p, r) for r in p.responses)
        assert not data.math_correct(p, p.responses[0] + "1")
        assert not data.math_correct(p, "")


def test_a_final_answer_in_other_digits_is_wrong_not_an_error():
    p = data.Problem("math", "1+2=", [], 3, "1+2=")
    for response in ["1+2=³", "1+2=٠٣"]:  # superscript three (int() refuses it); Arabic-Indic zero three
        assert not data.math_correct(p, response), f"{response!r}: only ASCII digits are an answer"
        assert data.score([p], [response]) == [False], f"{response!r} scored right"
        assert data.score([p], [response], strict=True) == [False], f"{response!r} scored right by strict"


def test_strict_math_reads_only_ascii_digits_in_the_working():
    p = data.Problem("math", "3+4+5=", [], 12, "3+4+5=")
    response = "٣+4=07,07+5=12"  # the first step's 3 in Arabic-Indic
    assert data.math_correct(p, response) and not data.math_strict_correct(p, response), "a step in other digits held"


def test_code_verifier_accepts_every_reference_and_rejects_wrong_bodies():
    rng = random.Random(2)
    for _ in range(3):
        p = data.sample_problem("code", "test", rng)
        assert all(data.score([p] * len(p.responses), p.responses))
        assert not data.code_correct(p, "    return None")
        assert not data.code_correct(p, "    return sum(xs")  # syntax error


def test_scoring_goes_on_past_bodies_that_crash_hang_or_flood():
    p = data.fixed_problems("code", "test", 1)[0]
    bad = ["    while True:\n        pass", "    import sys\n    sys.exit(0)", "    print('x' * 10 ** 7)\n    return 0",
           "    raise SystemExit", "    return f(xs)"]  # the last recurses until Python stops it
    assert data.score([p] * (len(bad) + 1), bad + [p.responses[0]]) == [False] * len(bad) + [True]


FORGERIES = {  # each passed every code problem while the sandbox judged itself and printed its count of passes
    "an object equal to anything": "    class x:__eq__=lambda*a:1\n    return x()",
    "a count printed on fd 1": "    import os\n    os.write(1, b'5')\n    os._exit(0)",
    "json.dumps patched": "    import json\n    json.dumps = lambda *a, **k: '5'\n    return 0",
    "the runner's expected values read":
        "    import sys\n    return next(w for x, w in sys.modules['__main__'].tests if x == xs)",
}


@pytest.mark.parametrize("forgery", FORGERIES)
def test_a_forged_pass_is_refused(forgery):
    problems = data.fixed_problems("code", "test", 6)
    assert data.score(problems, [FORGERIES[forgery]] * len(problems)) == [False] * len(problems)


def test_values_of_another_type_are_not_equal():
    assert data.same_value([1, 2], [1, 2]) and data.same_value(0, 0)
    assert not data.same_value(True, 1) and not data.same_value(6.0, 6) and not data.same_value([1.0], [1])
    assert not data.same_value([1], [1, 2]) and not data.same_value(None, 0)


def test_hidden_tests_meet_and_miss_every_condition():
    problems = [data.code_problem(random.Random(i)) for i in range(300)] + list(data.fixed_problems("code", "test"))
    for p in problems:
        values = [x for xs, _ in p.answer for x in xs]
        assert min(values) < 0 and max(values) > 9, p.key
        if " if " in p.key:
            condition = p.key.split(" if ")[1]
            met = [eval(condition, {"x": x}) for x in values]
            assert any(met) and not all(met), p.key


def test_a_body_that_ignores_its_condition_fails():
    rng = random.Random(0)
    p = next(p for p in (data.code_problem(rng) for _ in range(10 ** 5)) if p.key == "list of x-2 for x in xs if x>9")
    assert all(data.score([p] * len(p.responses), p.responses))
    assert not data.code_correct(p, "    return list(--2 for x in xs if x>9)")  # the issue's: passed on digits 0-9


class _Picks(random.Random):
    """An rng that returns the picks given first: code_problem's op, expression and
    condition (choice), then its two constants (randint); random draws after them."""

    def __init__(self, *picks):
        super().__init__(0)
        self.picks = list(picks)

    def choice(self, seq):
        return self.picks.pop(0) if self.picks else super().choice(seq)

    def randint(self, a, b):
        return self.picks.pop(0) if self.picks else super().randint(a, b)


@pytest.fixture(scope="module")
def every_code_draw():
    """(problem, op, expression, condition) for every draw code_problem can make."""
    draws = []
    ops, constants = ("sum", "count", "list"), range(1, 10)
    for op, e, c, ke, kc in itertools.product(ops, data._EXPRS, data._CONDS, constants, constants):
        p = data.code_problem(_Picks(op, e, c, ke, kc))
        expr, cond = ("x" if op == "count" else e.replace("k", str(ke))), c.replace("k", str(kc))
        spec = ("count" if op == "count" else f"{op} of {expr}") + " for x in xs" + (f" if {cond}" if cond else "")
        assert p.key == spec, f"the picks were not read in order: {p.key!r} for {spec!r}"
        draws.append((p, op, expr, cond))
    return draws


def test_hidden_tests_depend_only_on_the_spec(every_code_draw):
    answers = {}
    for p, *_ in every_code_draw:
        assert answers.setdefault(p.key, p.answer) == p.answer, f"{p.key}: two draws of it, two sets of hidden tests"


@lru_cache(maxsize=None)
def _function(body):
    """f with this body, run here rather than in the sandbox (our own bodies): only for speed."""
    scope = {}
    exec("def f(xs):\n" + body, scope)
    return scope["f"]


def _wrong_bodies(op, expr, cond):
    """Plausible wrong bodies for a spec, each with one thing changed: the reduction; the
    expression (another operator, its constant off by up to three, the threshold's in its
    place); or the condition (dropped, its threshold off by up to three, another comparison,
    the other parity, one more condition: x!=0, x>0, x<0, a parity)."""
    near = sorted({k + d for k in {0, *map(int, re.findall(r"\d+", expr + cond))} for d in range(-3, 4)})
    exprs = {t.replace("k", str(j)) for t in ("x", "-x", "x*x", "x*k", "k*x", "x+k", "x-k", "k-x", "k") for j in near}
    extra = ("x!=0", "x>0", "x<0", "x%2==0", "x%2==1")
    conds = ({"", "x%2==0", "x%2==1"} | {f"x{cmp}{j}" for cmp in (">", "<", ">=", "<=", "==", "!=") for j in near}
             | ({f"{cond} and {c}" for c in extra} if cond else set()))
    variants = [(o, "x" if op == "count" else expr, cond) for o in ("sum", "count", "list") if o != op]
    variants += [(op, e, cond) for e in exprs if op != "count"] + [(op, expr, c) for c in conds]
    return [data._bodies(*v)[0] for v in variants if v != (op, expr, cond)]


def test_hidden_tests_fail_every_plausible_wrong_body(every_code_draw):
    """Every spec the generator can make, every wrong body of _wrong_bodies, judged by the
    verifier's comparison. A body is skipped only if it equals the reference on every list of
    integers: both reduce per-element terms (a sum, a count or a list of them), so they agree
    on every list iff on every one-element list; and their thresholds all lie in -3..12,
    beyond which each term is a polynomial of degree at most 2 on each parity class, so
    agreeing on -100..100 means agreeing on every integer."""
    leaks, specs = [], {p.key: (p, op, expr, cond) for p, op, expr, cond in every_code_draw}
    for p, op, expr, cond in specs.values():  # one draw per spec: the others have the same tests
        right = _function(p.responses[0])
        assert all(data.same_value(right(xs), want) for xs, want in p.answer), f"{p.key}: the reference fails"
        for body in _wrong_bodies(op, expr, cond):
            wrong = _function(body)
            if all(data.same_value(wrong(xs), want) for xs, want in p.answer) and not all(
                    data.same_value(wrong([x]), right([x])) for x in range(-100, 101)):
                leaks.append(f"{p.key}: {body.strip()}")
    assert not leaks, f"{len(leaks)} wrong bodies pass their hidden tests, e.g. {leaks[:5]}"


def test_strict_math_wants_every_equation_true():
    cases = [("2+4+3=", "05+==09"), ("4*5+2*3=", "40+=6=26"), ("(3+4)*4=", "3*4=16,4*4=12,16+12=28"),
             ("(3+4)*4=", "3+4=07,07*4=29,00+28=28"), ("1+2+3=", "1+2=04,04+2=06")]
    for prompt, response in cases:  # right by the final answer, wrong by the working
        p = data.Problem("math", prompt, [], eval(prompt[:-1]), prompt)
        assert data.math_correct(p, response) and not data.math_strict_correct(p, response), response
        assert data.score([p], [response]) == [True] and data.score([p], [response], strict=True) == [False]
    rng = random.Random(1)
    for _ in range(200):
        p = data.sample_problem("math", "test", rng)
        assert all(data.math_strict_correct(p, r) for r in p.responses), p.prompt
        assert not data.math_strict_correct(p, p.responses[0] + "1")


def test_strict_scoring_leaves_code_as_it_is():
    problems = data.fixed_problems("code", "test", 2)
    responses = [problems[0].responses[0], "    return None"]
    assert data.score(problems, responses, strict=True) == data.score(problems, responses) == [True, False]


def test_splits_are_disjoint_and_test_prompts_never_in_training():
    test_prompts = {p.prompt for t in data.TASKS for p in data.fixed_problems(t, "test")}
    rng = random.Random(3)
    train_prompts = {data.sample_problem(t, "train", rng).prompt for _ in range(3000) for t in data.TASKS}
    assert not test_prompts & train_prompts
    # and by construction: the split is a function of the problem's defining key
    problem = data.code_problem(random.Random(4))
    assert data.split_of(problem.key) in ("train", "val", "test") and problem.key in problem.prompt


def test_test_set_is_fixed_by_its_seed():
    a = data.fixed_problems("math", "test", 20)
    data.fixed_problems.cache_clear()
    assert [p.prompt for p in data.fixed_problems("math", "test", 20)] == [p.prompt for p in a]


def test_batches_have_one_narrow_canvas_per_task(enc):
    math, code = data.get_batch(enc, 8, random.Random(0))
    assert math.shape == (5, data.PROMPT_WIDTHS[0] + data.GEN_LEN) and math.dtype == torch.long
    assert code.shape == (3, data.PROMPT_LEN + data.GEN_LEN)
    for x in (math, code):
        assert (x[:, -1] == enc.eos).all()  # the response is the last GEN_LEN columns, ending in EOS padding
        assert not (x == enc.mask).any()
