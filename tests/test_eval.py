import json
import shutil

import pytest

import eval as evaluate
import report
import train_base
import train_head
from conftest import TINY, one_line_error


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny base and a head whose tau=0 sends back all it may: (base path, head path)."""
    d = tmp_path_factory.mktemp("run")
    base, head = str(d / "base.pt"), str(d / "head.pt")
    train_base.main(TINY + ["--out", base, "--max-iters", "2", "--eval-every", "2"])
    train_head.main(["--base", base, "--out", head, "--max-iters", "2", "--batch-size", "8", "--val-problems", "2",
                     "--width", "16", "--taus", "0.0", "--device", "cpu"])
    return base, head


def test_eval_compares_every_method_at_equal_forward_passes(tmp_path, tiny_run):
    (base, head), out = tiny_run, str(tmp_path / "eval.json")
    evaluate.main(["--base", base, "--head", head, "--head-nofca", head, "--proseco", str(tmp_path / "none.pt"),
                   "--ar", str(tmp_path / "none.pt"),
                   "--num", "4", "--steps", "8", "--thresholds", "0.5", "--out", out])
    result = json.load(open(out))
    rows = {(r["task"], r["rule"], r["decoder"]): r for r in result["rows"]}
    assert {d for _, _, d in rows} == {"base", "dsc", "no-fca", "random", "remdm-conf", "remdm-loop"}
    for task in ("math", "code"):
        assert all(r["mean_passes"] <= 8 + 2 for (t, rule, _), r in rows.items() if t == task and rule == "fixed"), \
            "more than the budget and a refill step per block"
        # tau=0 sends back all it may: the control sends back as many (under the fixed schedule, step for step)
        assert rows[task, "fixed", "dsc"]["remasked_per_problem"] > 0
        dsc, random_control = rows[task, "fixed", "dsc"], rows[task, "fixed", "random"]
        assert random_control["remasked_per_problem"] == dsc["remasked_per_problem"]
        assert len(rows[task, "threshold", "base"]["right"]) == 4
        lo, hi = rows[task, "fixed", "dsc"]["interval"]
        assert lo <= rows[task, "fixed", "dsc"]["accuracy"] <= hi


def test_eval_runs_proseco_at_the_unmasking_budget_and_at_equal_total_passes(tmp_path, tiny_run):
    (base, _), out, none = tiny_run, str(tmp_path / "eval.json"), str(tmp_path / "none.pt")
    evaluate.main(["--base", base, "--proseco", base,  # the base as ProSeCo
                   "--head", none, "--head-nofca", none, "--ar", none,
                   "--num", "4", "--steps", "8", "--thresholds", "", "--out", out])
    result = json.load(open(out))
    rows = {(r["task"], r["decoder"]): r for r in result["rows"]}
    claims = {(c["task"], tuple(c["a"]), tuple(c["b"])) for c in result["comparisons"]}
    for task in ("math", "code"):
        assert rows[task, "proseco-equal"]["mean_passes"] <= 8  # predictor + corrector within the others' 8
        assert rows[task, "proseco"]["mean_passes"] > rows[task, "proseco-plain"]["mean_passes"]  # passes on top
        # reported apart: one corrector pass after every predictor pass (S=1, omega=1) is half the total
        assert rows[task, "proseco"]["mean_corrector_passes"] == rows[task, "proseco"]["mean_passes"] / 2
        assert rows[task, "proseco-plain"]["mean_corrector_passes"] == 0
        assert (task, ("proseco-equal", "fixed", 4), ("base", "fixed", 4)) in claims


def test_eval_reads_several_runs_and_compares_on_each(tmp_path, tiny_run, capsys):
    base, head = tiny_run
    runs = [tmp_path / "seed_a", tmp_path / "seed_b"]
    for run in runs:
        run.mkdir()
        shutil.copy(base, run / "base.pt")
        shutil.copy(head, run / "head.pt")
    out = str(tmp_path / "eval.json")
    evaluate.main(["--runs", *map(str, runs), "--num", "4", "--steps", "32,8", "--thresholds", "",
                   "--out", out])
    result = json.load(open(out))
    assert {r["run"] for r in result["rows"]} == set(map(str, runs))
    claims = {(c["run"], c["task"], c["metric"], tuple(c["a"]), tuple(c["b"])) for c in result["comparisons"]}
    for run in map(str, runs):
        assert (run, "math", "strict", ("dsc", "fixed", 4), ("random", "fixed", 4)) in claims
        assert (run, "code", "final", ("dsc", "fixed", 4), ("base", "fixed", 1)) in claims
    assert "across 2 runs" in capsys.readouterr().out


def test_the_interval_of_an_accuracy_matches_the_normal_approximation():
    # p = 0.5 on 100 problems: 0.5 -+ 1.96 * sqrt(0.25 / 100) = (0.402, 0.598)
    lo, hi = report.interval([1] * 50 + [0] * 50)
    assert abs(lo - 0.402) < 0.015 and abs(hi - 0.598) < 0.015


def test_a_paired_interval_sees_only_the_problems_on_which_two_decoders_differ():
    # a beats b on 10 of 100 problems and agrees elsewhere: 0.1 -+ 1.96 * sqrt(0.09 / 100) = (0.041, 0.159),
    # where unpaired accuracies of 0.6 and 0.5 would each be about -+ 0.1 wide
    a, b = [1] * 60 + [0] * 40, [1] * 50 + [0] * 50
    lo, hi = report.interval(a, baseline=b)
    assert abs(lo - 0.041) < 0.015 and abs(hi - 0.159) < 0.015


def test_a_decoder_with_a_cache_is_compared_with_itself_uncached_at_the_same_setting():
    row = lambda decoder, right: {"task": "code", "decoder": decoder, "rule": "threshold", "threshold": 0.9,  # noqa
                                  "right": right}
    rows = [row("base", [1, 1, 0, 0]), row("base+dual", [1, 0, 0, 0]), row("dsc", [1, 1, 1, 0]),
            row("dsc+prefix", [1, 1, 1, 1])]
    found = {(c["a"][0], c["b"][0]): c["difference"] for c in report.comparisons(rows)}
    assert found[("base+dual", "base")] == -0.25 and found[("dsc+prefix", "dsc")] == 0.25
    assert ("dsc+prefix", "base") not in found


def test_summary_is_the_fewest_mean_passes_within_two_points_of_the_base_at_one_token_per_step():
    row = lambda decoder, rule, acc, passes, k=None: {"task": "math", "decoder": decoder, "rule": rule,  # noqa: E731
                                                      "tokens_per_step": k, "accuracy": acc, "mean_passes": passes}
    rows = [row("base", "fixed", 0.90, 20.0, k=1), row("base", "fixed", 0.80, 5.0, k=4),
            row("base", "threshold", 0.885, 7.5), row("base", "threshold", 0.87, 6.0),
            row("dsc", "threshold", 0.95, 4.0), row("dsc", "fixed", 0.70, 3.0, k=8),
            row("remdm-conf", "fixed", 0.5, 4.0, k=8)]
    assert report.summary(rows) == {("math", "base"): 7.5, ("math", "dsc"): 4.0, ("math", "remdm-conf"): None}


def test_eval_runs_each_diffusion_decoder_with_each_cache_and_prosecos_loop_uncached_only(tmp_path, tiny_run):
    (base, head), out = tiny_run, str(tmp_path / "eval.json")
    evaluate.main(["--base", base, "--head", head, "--proseco", base, "--ar", str(tmp_path / "none.pt"),
                   "--decoders", "base,dsc,random,proseco-plain,proseco", "--cache", "none,dual", "--num", "3",
                   "--steps", "8", "--thresholds", "", "--out", out])
    names = {r["decoder"] for r in json.load(open(out))["rows"]}
    assert names == {"base", "dsc", "random", "proseco-plain", "proseco", "base+dual", "dsc+dual", "random+dual",
                     "proseco-plain+dual"}


def test_eval_counts_the_flops_of_the_columns_each_pass_fed(tmp_path, tiny_run):
    import data
    from common import load_model
    (base, _), out = tiny_run, str(tmp_path / "eval.json")
    evaluate.main(["--base", base, "--decoders", "base", "--cache", "none,prefix,dual", "--num", "3",
                   "--steps", "8", "--thresholds", "", "--out", out])
    rows = {(r["task"], r["decoder"]): r for r in json.load(open(out))["rows"]}
    model, enc = load_model(base)[0], data.get_tokenizer()
    for task in data.TASKS:
        width = len(data.encode_prompt(enc, data.fixed_problems(task, "test", 1)[0].prompt))
        whole = rows[task, "base"]["mean_passes"] * model.pass_flops(width + data.GEN_LEN, width + data.GEN_LEN) / 1e9
        assert abs(rows[task, "base"]["gflops_per_answer"] - whole) < 1e-9 * whole  # every pass the whole canvas
        assert whole > rows[task, "base+prefix"]["gflops_per_answer"] > rows[task, "base+dual"]["gflops_per_answer"]


def test_eval_times_answers_per_second_at_each_batch_size_and_counts_tokens_per_pass(tmp_path, tiny_run):
    (base, _), out = tiny_run, str(tmp_path / "eval.json")
    evaluate.main(["--base", base, "--decoders", "base", "--num", "3", "--steps", "32", "--thresholds", "",
                   "--throughput", "2,5", "--out", out])
    for r in json.load(open(out))["rows"]:
        assert set(r["answers_per_second"]) == {"2", "5"} and min(r["answers_per_second"].values()) > 0
        assert 0 < r["tokens_per_pass"] <= 1  # one token revealed per pass: an answer is at most its passes


def test_eval_eager_decodes_without_compiling(tmp_path, tiny_run, monkeypatch):
    (base, _), seen = tiny_run, []
    decode = evaluate.decode_problems
    monkeypatch.setattr(evaluate, "decode_problems",
                        lambda *a, **kw: (seen.append(kw.get("compile")), decode(*a, **kw))[1])
    evaluate.main(["--base", base, "--decoders", "base", "--eager", "--num", "2", "--steps", "8",
                   "--thresholds", "", "--out", str(tmp_path / "eval.json")])
    assert seen and all(c is False for c in seen)


@pytest.mark.parametrize("argv,message", [(["--cache", "none,suffix"], "--cache"),
                                          (["--decoders", "base,bogus"], "unknown bogus"),
                                          (["--decoders", "random"], "name dsc too"),
                                          (["--throughput", "0"], "--throughput")])
def test_eval_refuses_a_bad_cache_decoder_or_batch_size_in_one_line(argv, message):
    assert message in one_line_error(evaluate.main, argv)


def test_eval_refuses_a_block_length_that_does_not_fit_a_budget(tmp_path):
    with pytest.raises(SystemExit, match="^error: .*") as e:  # one line, before any checkpoint is read
        evaluate.main(["--steps", "2", "--block-len", "8", "--base", str(tmp_path / "none.pt")])
    assert e.value.code != 0


# what the adversarial probe found: nothing lost, every input checked before the first expensive step


@pytest.mark.parametrize("spelling", ["weights/base.pt", "./weights/head.pt", "weights/../weights/ar.pt"])
def test_eval_out_never_writes_over_a_shipped_checkpoint(spelling, monkeypatch):
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.chdir(root)
    before = open(spelling, "rb").read()
    assert "a .json report goes to a file whose name ends .json" in one_line_error(evaluate.main, ["--out", spelling])
    assert open(spelling, "rb").read() == before


def test_eval_out_never_writes_over_a_checkpoint_named_like_a_report(tmp_path, tiny_run):
    base, _ = tiny_run
    checkpoint = open(base, "rb").read()
    report, picture = tmp_path / "eval.json", tmp_path / "eval.png"
    report.write_bytes(checkpoint)
    message = one_line_error(evaluate.main, ["--base", base, "--out", str(report)])
    assert "holds something other than a .json report" in message and report.read_bytes() == checkpoint
    report.write_text("{}")  # an earlier report may be replaced; the plot beside it is a checkpoint
    picture.write_bytes(checkpoint)
    message = one_line_error(evaluate.main, ["--base", base, "--out", str(report), "--plot"])
    assert "holds something other than a .png report" in message and picture.read_bytes() == checkpoint


@pytest.mark.parametrize("setting", ["tau=nan", "tau=2", "check_every=0", "max_per_position=0", "max_per_check=-1"])
def test_eval_refuses_head_settings_that_cannot_work(setting):
    assert setting.split("=")[0] in one_line_error(evaluate.main, ["--head-settings", setting])


def test_eval_refuses_zero_steps_in_one_line():
    assert "--steps" in one_line_error(evaluate.main, ["--steps", "0"])


def test_eval_refuses_steps_that_give_no_whole_tokens_per_step(tmp_path):  # one block: 5 steps fit the schedule
    argv = ["--steps", "5", "--block-len", "32", "--base", str(tmp_path / "none.pt")]  # refused before it is read
    assert "whole tokens per step" in one_line_error(evaluate.main, argv)


def test_eval_refuses_a_seed_torch_cannot_take_with_a_usage_error():
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--seed", str(2 ** 64)])
    assert stop.value.code == 2


def test_eval_checks_every_run_before_decoding_any(tmp_path, tiny_run, monkeypatch):
    base, _ = tiny_run
    good, missing = tmp_path / "good", tmp_path / "missing"
    good.mkdir()
    shutil.copy(base, good / "base.pt")
    monkeypatch.setattr(evaluate, "evaluate_run", lambda *a: pytest.fail("decoded a run before checking the next"))
    assert "missing/base.pt does not exist" in one_line_error(evaluate.main, ["--runs", str(good), str(missing)])


def test_eval_after_the_readme_main_job_on_a_fresh_copy_uses_its_own_weights(tmp_path):
    """A newcomer's main job (tiny here), then eval: the shipped heads belong with the shipped
    base, so they are skipped with a note, and the newcomer's base and head are evaluated."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    copy = tmp_path / "fresh"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("out", "runs", ".git", "__pycache__", "tests"))

    def run(*argv):
        result = subprocess.run([sys.executable, *argv], cwd=copy, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        return result
    run("train_base.py", *TINY, "--max-iters", "2", "--eval-every", "2")
    run("train_head.py", "--max-iters", "2", "--batch-size", "8", "--val-problems", "2", "--width", "16",
        "--device", "cpu")
    result = run("eval.py", "--decoders", "base,dsc,no-fca", "--num", "2", "--steps", "8", "--thresholds", "",
                 "--device", "cpu")
    assert "skipping" in result.stderr and "head_nofca.pt" in result.stderr and "--no-fca" in result.stderr
    rows = json.load(open(copy / "out" / "eval.json"))["rows"]
    assert {"base", "dsc"} <= {r["decoder"] for r in rows} and "no-fca" not in {r["decoder"] for r in rows}
