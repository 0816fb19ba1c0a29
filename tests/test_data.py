import random

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


def test_sandbox_contains_hostile_bodies(tmp_path):
    p = data.fixed_problems("code", "test", 1)[0]
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    hostile = ["    while True:\n        pass", "    import os\n    os.fork()\n    return 0",
               "    x = bytearray(10 * 1024 ** 3)\n    return 0", f"    open({str(tmp_path / 'new.txt')!r}, 'w')\n    return 0",
               f"    import os\n    os.remove({str(victim)!r})\n    return 0", "    print('x' * 10 ** 7)\n    return 0",
               "    import socket\n    socket.create_connection(('127.0.0.1', 9))\n    return 0",
               "    import sys\n    sys.exit(0)", "    import shutil\n    shutil.rmtree('/tmp')"]
    verdicts = data.score([p] * len(hostile), hostile)  # the evaluation goes on past each failure
    assert not any(verdicts)
    assert victim.read_text() == "keep" and not (tmp_path / "new.txt").exists()


def test_sandbox_ends_an_infinite_loop_within_its_limit():
    import time
    p = data.fixed_problems("code", "test", 1)[0]
    t0 = time.monotonic()
    assert not data.code_correct(p, "    while True:\n        pass")
    assert time.monotonic() - t0 < 10  # CPU limit 2 s, wall clock 5 s


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
