import json

import pytest

import eval as evaluate
import train_base
import train_head
from test_train import TINY


def test_eval_compares_every_method_at_equal_forward_passes(tmp_path):
    base, head, out = str(tmp_path / "base.pt"), str(tmp_path / "head.pt"), str(tmp_path / "eval.json")
    train_base.main(TINY + ["--out", base, "--max-iters", "2", "--eval-every", "2"])
    train_head.main(["--base", base, "--out", head, "--max-iters", "2", "--batch-size", "8", "--val-problems", "2",
                     "--width", "16", "--taus", "0.0", "--device", "cpu"])
    evaluate.main(["--base", base, "--head", head, "--head-nofca", head, "--proseco", str(tmp_path / "none.pt"),
                   "--num", "4", "--tokens-per-step", "4", "--out", out])
    rows = {(r["task"], r["method"]): r for r in json.load(open(out))["rows"]}
    assert {m for _, m in rows} == {"base", "dsc", "no-fca", "random", "remdm"}
    assert {r["forward_passes"] for r in rows.values()} == {8}  # 32 tokens at 4 per step
    for task in ("math", "code"):  # tau=0 sends back all it may: the control sends back exactly as many
        assert rows[task, "dsc"]["remasked_per_problem"] > 0
        assert rows[task, "random"]["remasked_per_problem"] == rows[task, "dsc"]["remasked_per_problem"]


def test_eval_refuses_a_block_length_that_does_not_fit_a_budget(tmp_path):
    with pytest.raises(SystemExit, match="^error: .*block length") as e:  # one line, before any checkpoint is read
        evaluate.main(["--tokens-per-step", "16", "--block-len", "8", "--base", str(tmp_path / "none.pt")])
    assert e.value.code != 0
