import json

import pytest

import eval as evaluate
import train_base
import train_head
from conftest import TINY


def test_eval_compares_every_method_at_equal_forward_passes(tmp_path):
    base, head, out = str(tmp_path / "base.pt"), str(tmp_path / "head.pt"), str(tmp_path / "eval.json")
    train_base.main(TINY + ["--out", base, "--max-iters", "2", "--eval-every", "2"])
    train_head.main(["--base", base, "--out", head, "--max-iters", "2", "--batch-size", "8", "--val-problems", "2",
                     "--width", "16", "--taus", "0.0", "--device", "cpu"])
    evaluate.main(["--base", base, "--head", head, "--head-nofca", head, "--proseco", str(tmp_path / "none.pt"),
                   "--num", "4", "--tokens-per-step", "4", "--thresholds", "0.5", "--out", out])
    result = json.load(open(out))
    rows = {(r["task"], r["rule"], r["decoder"]): r for r in result["rows"]}
    assert {d for _, _, d in rows} == {"base", "dsc", "no-fca", "random", "remdm"}
    for task in ("math", "code"):
        assert all(r["mean_passes"] <= 8 for (t, rule, _), r in rows.items() if t == task and rule == "fixed")
        # tau=0 sends back all it may: the control sends back as many (under the fixed schedule, step for step)
        assert rows[task, "fixed", "dsc"]["remasked_per_problem"] > 0
        assert rows[task, "fixed", "random"]["remasked_per_problem"] == rows[task, "fixed", "dsc"]["remasked_per_problem"]
        assert len(rows[task, "threshold", "base"]["right"]) == 4


def test_summary_is_the_fewest_mean_passes_within_two_points_of_the_base_at_one_token_per_step():
    row = lambda decoder, rule, acc, passes, k=None: {"task": "math", "decoder": decoder, "rule": rule,  # noqa: E731
                                                      "tokens_per_step": k, "accuracy": acc, "mean_passes": passes}
    rows = [row("base", "fixed", 0.90, 20.0, k=1), row("base", "fixed", 0.80, 5.0, k=4),
            row("base", "threshold", 0.885, 7.5), row("base", "threshold", 0.87, 6.0),
            row("dsc", "threshold", 0.95, 4.0), row("dsc", "fixed", 0.70, 3.0, k=8), row("remdm", "fixed", 0.5, 4.0, k=8)]
    assert evaluate.summary(rows) == {("math", "base"): 7.5, ("math", "dsc"): 4.0, ("math", "remdm"): None}


def test_eval_refuses_a_block_length_that_does_not_fit_a_budget(tmp_path):
    with pytest.raises(SystemExit, match="^error: .*") as e:  # one line, before any checkpoint is read
        evaluate.main(["--tokens-per-step", "16", "--block-len", "8", "--base", str(tmp_path / "none.pt")])
    assert e.value.code != 0
