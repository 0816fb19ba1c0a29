import random

import pytest
import torch

import data


def test_tokenizer_round_trips_any_text(enc):
    texts = ["(3+4)*7=3+4=7,7*7=49", "def f(xs):\n    return [x*3 for x in xs]\n", "héllo ünïcode → 数学 🙂\t\r\n  x"]
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
