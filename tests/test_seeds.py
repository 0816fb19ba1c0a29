import json
import os
import shutil
import stat
import subprocess

import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# stands in for python: logs each call, writes what --out names, fails train_base.py for the seed in $FAIL_SEED
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> calls.log
[ "$1" = train_base.py ] && [ "$3" = "${FAIL_SEED:-none}" ] && exit 1
out=""; prev=""
for a in "$@"; do [ "$prev" = --out ] && out=$a; prev=$a; done
[ -n "$out" ] && echo '{}' > "$out"
exit 0
"""


def run_seeds(tmp_path, fail_seed=None, parallel=1):
    """seeds.sh in a fresh copy (no runs/) with a fake python: (exit status, the calls it made)."""
    shutil.copy(os.path.join(ROOT, "seeds.sh"), tmp_path / "seeds.sh")
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "python").write_text(FAKE_PYTHON)
    (shims / "python").chmod(stat.S_IRWXU)
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "SEEDS": "11 12", "FAIL_SEED": str(fail_seed),
           "PARALLEL": str(parallel)}
    done = subprocess.run(["bash", "seeds.sh"], cwd=tmp_path, env=env, capture_output=True, text=True)
    return done.returncode, (tmp_path / "calls.log").read_text().splitlines()


def test_seeds_sh_trains_and_evaluates_each_seed_then_reports_across_them(tmp_path):
    status, calls = run_seeds(tmp_path)
    assert status == 0
    for seed in (11, 12):
        assert any(c.startswith(f"train_base.py --seed {seed} ") for c in calls)
        assert any(c.startswith("eval.py --runs runs/seed%d " % seed) for c in calls)
    assert calls[-1] == "report.py runs/seed11/eval.json runs/seed12/eval.json"


def test_seeds_sh_fails_without_a_report_when_a_seed_fails(tmp_path):
    status, calls = run_seeds(tmp_path, fail_seed=12, parallel=3)  # every seed at once: waited for after the loop
    assert status != 0 and not any(c.startswith("report.py") for c in calls)


def saved_report(path, run, accuracy, split="test"):
    row = {"task": "code", "rule": "fixed", "tokens_per_step": 1, "decoder": "base", "accuracy": accuracy,
           "mean_passes": 30.0, "run": run}
    comparison = {"task": "code", "metric": "final", "a": ["dsc", "fixed", 4], "b": ["base", "fixed", 4],
                  "difference": accuracy - 0.5, "interval": [0.1, 0.6], "run": run}
    path.write_text(json.dumps({"rows": [row], "split": split, "runs": {run: {}}, "comparisons": [comparison]}))
    return str(path)


def test_report_averages_the_runs_of_reports_saved_apart(tmp_path, capsys):
    report.main([saved_report(tmp_path / "a.json", "runs/seed11", 0.9),
                 saved_report(tmp_path / "b.json", "runs/seed12", 1.0)])
    assert "| code | 1 tokens/step | base | 95.0 +- 7.1 (90.0, 100.0) |" in capsys.readouterr().out


def test_report_keeps_the_paired_comparisons_of_reports_saved_apart(tmp_path, capsys):
    report.main([saved_report(tmp_path / "a.json", "runs/seed11", 0.9),
                 saved_report(tmp_path / "b.json", "runs/seed12", 1.0)])
    assert "| dsc 4 tokens/step - base 4 tokens/step | +45.0 +- 7.1 (+40.0, +50.0) | yes |" in capsys.readouterr().out


def test_report_refuses_a_run_that_two_reports_hold(tmp_path):
    from conftest import one_line_error
    a = saved_report(tmp_path / "a.json", "runs/seed11", 0.9)
    assert "already in an earlier report" in one_line_error(report.main, [a, a])


def test_report_refuses_a_file_that_is_not_an_eval_report(tmp_path):
    from conftest import one_line_error
    (tmp_path / "x.json").write_text("[1, 2]")
    assert "not an eval.py report" in one_line_error(report.main, [str(tmp_path / "x.json")])


def test_report_refuses_reports_of_different_splits(tmp_path):
    from conftest import one_line_error
    a = saved_report(tmp_path / "a.json", "runs/seed11", 0.9)
    b = saved_report(tmp_path / "b.json", "runs/seed12", 1.0, split="val")
    assert "the reports score different splits" in one_line_error(report.main, [a, b])
