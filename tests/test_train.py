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
