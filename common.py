"""
Infrastructure the scripts share, kept out of model.py so that file holds only the
network and its loss: checkpoints (one dict, written atomically, loaded with
weights_only=True, refused in one line when they do not fit), devices, flag checks,
the MFU peak, the learning-rate schedule, signal holding and distributed setup.
"""

import hashlib
import math
import os
import signal
import tempfile
import time
from contextlib import contextmanager

import torch

from model import GPT, GPTConfig


# -----------------------------------------------------------------------------
# checkpoints: one dict, written atomically, loaded with weights_only=True


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or does not match what is asked of it."""


def save_checkpoint(path, **state):
    """Write to a temporary file of this writer's own and rename it over `path`: a crash
    never leaves half a file and two writers never share one. Refuses a path that holds
    something other than a regular file (a device, a directory) and non-finite tensors."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise CheckpointError(f"{path} is not a regular file; a checkpoint is never written over it")
    bad = next((name for name, t in _tensors(state) if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:
        raise CheckpointError(f"not saving {path}: {bad} holds non-finite values")
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the checkpoint from other users
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _tensors(state, name="state"):
    """(name, tensor) for every tensor in a nested dict/list of a checkpoint."""
    if torch.is_tensor(state):
        yield name, state
    elif isinstance(state, dict):
        for k, v in state.items():
            yield from _tensors(v, f"{name}[{k!r}]" if name != "state" else str(k))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            yield from _tensors(v, f"{name}[{i}]")


def load_checkpoint(path, made_by=None):
    """The checkpoint dict at `path`. Raises CheckpointError naming the file (and, when
    given, the command that makes it) if it is missing, empty, truncated or not a safe checkpoint."""
    if not os.path.exists(path):
        hint = f"; run `{made_by}` to make it" if made_by else ""
        raise CheckpointError(f"{path} does not exist{hint}")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is not a regular file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # empty, truncated, corrupted, or a pickle that would run code
        raise CheckpointError(f"{path} is not a readable checkpoint ({_first_line(e, 120)})")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{path} is not a checkpoint of this project")
    ckpt["model"] = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    return ckpt


def _first_line(error, width):
    """`TypeName: first line of the message`, cut to width: errors with no message included."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0][:width]}" if lines else type(error).__name__


def kind_of(ckpt):
    """What a checkpoint holds: 'head' (train_head.py), or the base's objective, 'mdlm',
    'proseco' or 'ar' (the autoregressive reference)."""
    if "base_fingerprint" in ckpt:
        return "head"
    return (ckpt.get("config") or {}).get("objective", "mdlm")


DIFFUSION = ("mdlm", "proseco")  # the kinds the diffusion decoders (sample.py, eval.py, train_head.py) accept


def a_kind(kind):
    """`kind` with its article, for messages: 'a mdlm', 'an ar'."""
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def check_output_path(path, kind, inputs=None, replace=False, how="pass --overwrite to replace it"):
    """Refuse, before any work, to write a `kind` checkpoint (see kind_of) to `path` where
    that would destroy something: an empty path, an input of the same run (inputs: flag ->
    path), anything but a regular file, a checkpoint of another kind, or, unless replace, any
    existing file. Then check that the directory takes a new file. Raises CheckpointError."""
    if not path:
        raise CheckpointError("the output path is empty (--out '')")
    for flag, used in (inputs or {}).items():
        if os.path.exists(used) and os.path.exists(path) and os.path.samefile(used, path):
            raise CheckpointError(f"{path} is this run's {flag}: writing it would destroy the input")
    if os.path.exists(path):
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is not a regular file; a checkpoint is never written over it")
        try:
            existing = kind_of(load_checkpoint(path))
        except CheckpointError:
            existing = None  # not a checkpoint: replace decides
        if existing is not None and existing != kind:
            raise CheckpointError(f"{path} holds {a_kind(existing)} checkpoint; "
                                  f"this run writes {a_kind(kind)} checkpoint")
        if not replace:
            what = f"a trained {kind} checkpoint" if existing else "a file that is not a checkpoint"
            raise CheckpointError(f"{path} already holds {what}; {how}")
    directory = os.path.dirname(path) or "."
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise CheckpointError(f"cannot write {path}: {directory} is not a directory")
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=os.path.basename(path) + ".", suffix=".probe"):
            pass
    except OSError as e:
        raise CheckpointError(f"cannot write {path}: {e.strerror or e}")


def load_model(path, tokenizer_id=None, made_by="python train_base.py", kinds=DIFFUSION):
    """A GPT rebuilt from a checkpoint, in eval mode, refusing another tokenizer and any
    kind (see kind_of) not in `kinds`: a diffusion decoder never runs the AR model, nor the reverse."""
    ckpt = load_checkpoint(path, made_by)
    if kind_of(ckpt) not in kinds:
        raise CheckpointError(f"{path} holds {a_kind(kind_of(ckpt))} checkpoint; "
                              f"this needs {' or '.join(map(a_kind, kinds))} checkpoint")
    if tokenizer_id is not None and ckpt.get("tokenizer_id") != tokenizer_id:
        raise CheckpointError(f"{path} was trained with tokenizer {ckpt.get('tokenizer_id')}, "
                              f"this code builds tokenizer {tokenizer_id}")
    return rebuild(path, ckpt, GPT, GPTConfig), ckpt


def rebuild(path, ckpt, module_cls, config_cls):
    """module_cls(config_cls(**model_args)) with the checkpoint's weights, in eval mode;
    CheckpointError if the saved config or weights do not fit the class."""
    try:
        module = module_cls(config_cls(**ckpt["model_args"]))
        module.load_state_dict(ckpt["model"])
    except (TypeError, RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path} does not match {module_cls.__name__}: {_first_line(e, 160)}")
    return module.eval()


def model_fingerprint(model):
    """A short hash of the weights: a head records the base it was trained on."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# -----------------------------------------------------------------------------
# training utilities shared by train_base.py and train_head.py


def pick_device(name=None):
    """`name` if this machine has that device (ValueError if not), else the best available."""
    if name:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"{name!r} is not a device: cuda, cuda:N, mps or cpu") from None
        present = {"cpu": True, "mps": torch.backends.mps.is_available(),
                   "cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()}
        if not present.get(device.type, False):
            raise ValueError(f"this machine has no {name} device")
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def check_flags(args, checks=()):
    """ValueError naming the first flag that cannot work, checked before any work: the
    flags both training scripts share, then `checks`, (flag, holds, what it must be)."""
    shared = [("--batch-size", args.batch_size >= 1, "at least 1"),
              ("--max-iters", args.max_iters >= 1, "at least 1"),
              ("--lr", math.isfinite(args.lr) and args.lr > 0, "a finite number above 0"),
              ("--min-lr-frac", 0 <= args.min_lr_frac <= 1, "between 0 and 1"),
              ("--warmup", args.warmup >= 0, "at least 0")]
    for flag, holds, want in shared + list(checks):
        if not holds:
            raise ValueError(f"{flag} must be {want}, got {getattr(args, flag[2:].replace('-', '_'))}")


def peak_flops(device):
    """The FLOP/s that MFU is measured against: bf16 datasheet peak on a known GPU,
    else a measured fp32 matmul rate on this machine."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        for key, peak in [("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L4", 121e12), ("4090", 165e12)]:
            if key in name:
                return peak, f"{name} bf16 datasheet"
    a = torch.randn(1024, 1024, device=device)
    a @ a
    t0, n = time.perf_counter(), 10
    for _ in range(n):
        a @ a
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * 1024 ** 3 * n / (time.perf_counter() - t0), "measured fp32 matmul"


@contextmanager
def uninterrupted():
    """Hold Ctrl-C and SIGTERM until the block ends, then raise KeyboardInterrupt: an
    optimizer step interrupted halfway would leave some parameters (and their Adam
    step counts) one update ahead of the others in the checkpoint saved on exit."""
    held = []

    def hold(signum, frame):
        held.append(signum)

    previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if held:
        raise KeyboardInterrupt


def lr_at(it, args):
    """Linear warmup, then cosine decay to min_lr_frac of the peak."""
    if it < args.warmup:
        return args.lr * (it + 1) / args.warmup
    progress = min(1.0, (it - args.warmup) / max(1, args.max_iters - args.warmup))
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def setup_distributed(device=None):
    """(rank, local_rank, world size, device). Under torchrun (RANK is set) this joins the
    process group: NCCL with one GPU per rank on CUDA, Gloo on CPU. Otherwise one process."""
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 0, 1, pick_device(device)
    import torch.distributed as dist
    backend = "nccl" if pick_device(device).startswith("cuda") else "gloo"  # --device cpu stays on Gloo
    dist.init_process_group(backend=backend)
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    device = f"cuda:{local_rank}" if backend == "nccl" else "cpu"
    if backend == "nccl":
        torch.cuda.set_device(device)
    return rank, local_rank, world, device


def finish_distributed(model, world):
    """Leave the process group, first checking that DDP kept every replica's weights identical."""
    if world == 1:
        return
    import torch.distributed as dist
    prints = [None] * world
    dist.all_gather_object(prints, model_fingerprint(model))
    if dist.get_rank() == 0:
        print(f"replicas identical across {world} ranks: {len(set(prints)) == 1}")
    dist.barrier()  # leave together: a rank tearing Gloo down while its peer still talks can abort it
    dist.destroy_process_group()
