import torch

import train_base
import train_head
from model import load_checkpoint

TINY = ["--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--batch-size", "8", "--eval-problems", "4",
        "--device", "cpu"]


def test_base_training_saves_and_resumes_with_the_same_step_and_optimizer(tmp_path):
    out = str(tmp_path / "base.pt")
    train_base.main(TINY + ["--out", out, "--max-iters", "4", "--eval-every", "2"])
    first = load_checkpoint(out)
    assert first["iter"] == 4 and first["optimizer"]["state"]
    train_base.main(TINY + ["--out", out, "--max-iters", "6", "--eval-every", "2", "--resume"])
    second = load_checkpoint(out)
    assert second["iter"] == 6
    steps = [s["step"].item() for s in second["optimizer"]["state"].values()]
    assert set(steps) == {6.0}  # AdamW carried on from step 4, not from zero


def test_head_training_changes_the_head_and_leaves_the_base_bit_for_bit(tmp_path):
    base_path, head_path = str(tmp_path / "base.pt"), str(tmp_path / "head.pt")
    train_base.main(TINY + ["--out", base_path, "--max-iters", "2", "--eval-every", "2"])
    before = load_checkpoint(base_path)["model"]
    torch.manual_seed(0)
    base, head, initial = train_head.main(["--base", base_path, "--out", head_path, "--max-iters", "3",
                                           "--batch-size", "8", "--val-problems", "2", "--width", "16",
                                           "--device", "cpu"])
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(a, b) for a, b in zip(initial.values(), head.state_dict().values()))
    saved = load_checkpoint(head_path)
    assert saved["base_fingerprint"] and "auroc" in saved["metrics"]


def test_sigterm_saves_a_consistent_checkpoint_that_resumes(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    out = tmp_path / "base.pt"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, os.path.join(root, "train_base.py"), *TINY, "--out", str(out),
                             "--max-iters", "100000", "--eval-every", "3"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 120
    while not out.exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "continue with --resume" in stdout
    ckpt = load_checkpoint(str(out))
    steps = {s["step"].item() for s in ckpt["optimizer"]["state"].values()}
    assert ckpt["iter"] >= 3 and steps == {ckpt["iter"]}  # model, optimizer and step agree


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import pytest
    out = str(tmp_path / "base.pt")
    train_base.main(TINY + ["--out", out, "--max-iters", "2", "--eval-every", "2"])
    monkeypatch.setattr(train_base, "mdlm_loss", lambda *a: (torch.tensor(float("nan"), requires_grad=True),))
    with pytest.raises(SystemExit, match="loss became nan at step 2"):
        train_base.main(TINY + ["--out", out, "--max-iters", "4", "--eval-every", "2", "--resume"])
    assert load_checkpoint(out)["iter"] == 2


def test_head_training_and_eval_without_a_base_say_what_to_run(tmp_path):
    import pytest
    import eval as evaluate
    missing = str(tmp_path / "base.pt")
    for main, flag in [(train_head.main, "--base"), (evaluate.main, "--base")]:
        with pytest.raises(SystemExit, match=r"base.pt does not exist; run `python train_base.py`"):
            main([flag, missing])


def test_a_head_trained_on_another_base_is_refused(tmp_path):
    from corrector import CorrectionHead, HeadConfig, load_head
    from model import CheckpointError, save_checkpoint
    import pytest
    path = str(tmp_path / "head.pt")
    head = CorrectionHead(HeadConfig(n_embd_in=32, width=16))
    save_checkpoint(path, model=head.state_dict(), model_args=vars(head.config), base_fingerprint="aaaa")
    with pytest.raises(CheckpointError, match="head.pt was trained on base aaaa, but the base loaded is bbbb"):
        load_head(path, "bbbb")


def test_torchrun_two_cpu_ranks_keep_identical_replicas_and_save_one_checkpoint(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    import warnings
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "base.pt"

    def launch():
        with socket.socket() as s:  # a free port: a fixed one may still be held by an earlier run
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                               f"--master_port={port}", os.path.join(root, "train_base.py"), *TINY, "--out", str(out),
                               "--max-iters", "3", "--eval-every", "3"], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONFAULTHANDLER": "1"})  # an aborting rank prints its stacks

    result = launch()
    if result.returncode != 0 and "(SIGABRT) received by PID" in result.stderr:
        # twice in about 55 runs a rank aborted inside torch (a signal, not a Python error; cause not found);
        # one rerun keeps that from failing CI, and the warning keeps its stacks in the log
        warnings.warn("a torchrun rank aborted; ran it again. Its stderr:\n" + result.stderr)
        result = launch()
    assert result.returncode == 0, result.stderr  # whole: torchrun's summary hides the failing rank's own error
    assert "replicas identical across 2 ranks: True" in result.stdout
    assert load_checkpoint(str(out))["iter"] == 3


def test_decoded_drafts_are_labelled_against_the_closest_valid_response(enc):
    import data
    problem = data.fixed_problems("math", "test", 1)[0]
    row = torch.tensor(data.encode_response(enc, problem.responses[-1]))
    wrong = row.clone()
    wrong[0] = enc.encode_ordinary("9")[0] if row[0] != enc.encode_ordinary("9")[0] else enc.encode_ordinary("8")[0]
    assert train_head.wrong_tokens(enc, problem, wrong, accepted=False).nonzero().flatten().tolist() == [0]
    assert not train_head.wrong_tokens(enc, problem, row, accepted=False).any()
    assert not train_head.wrong_tokens(enc, problem, wrong, accepted=True).any()  # the verifier has the last word
