"""
Infrastructure the scripts share, kept out of model.py so that file holds only the
network and its loss: checkpoints (one dict, written atomically, loaded with
weights_only=True, refused in one line when they do not fit), devices, the MFU
peak, the learning-rate schedule, signal holding, distributed setup, and decoding a
list of problems in batches of one prompt width.
"""

import dataclasses
import hashlib
import math
import os
import re
import signal
import sys
import tempfile
import time
from contextlib import contextmanager

import torch

import data
from model import Transformer, TransformerConfig


# -----------------------------------------------------------------------------
# checkpoints: one dict, written atomically, loaded with weights_only=True


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or does not match what is asked of it."""


def save_checkpoint(path, **state):
    """Write to a temporary file of this writer's own (PATH.<pid>.<random>.tmp), then rename it over
    `path`: a crash never leaves half a file and two writers never share one; the temporaries
    a killed writer left beside `path` are removed first. Refuses a path that holds
    something other than a regular file (a device, a directory) and non-finite tensors."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise CheckpointError(f"{path} is not a regular file; a checkpoint is never written over it")
    bad = next((name for name, t in _tensors(state) if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:
        raise CheckpointError(f"not saving {path}: {bad} holds non-finite values")
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    try:
        torch.save(state, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temporaries(path):
    """Delete the PATH.<pid>.<random>.tmp files whose writer no longer runs (a SIGKILL
    mid-save leaves one behind)."""
    directory, name = os.path.dirname(path) or ".", os.path.basename(path)
    for entry in os.listdir(directory):
        pid = re.fullmatch(re.escape(name) + r"\.(\d+)\.[0-9a-f]+\.tmp", entry)
        if pid and not _alive(int(pid.group(1))):
            os.unlink(os.path.join(directory, entry))


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


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
    for key in ("model_args", "config", "remasking"):
        if key in ckpt and not isinstance(ckpt[key], dict):
            raise CheckpointError(f"{path} is not a checkpoint of this project: its {key} is not a dict")
    label, causal = ckpt.get("config", {}).get("objective"), ckpt.get("model_args", {}).get("causal", False)
    if label not in (None, "mdlm", "proseco", "ar"):
        raise CheckpointError(f"{path} names an objective this project does not train: {label!r}")
    if "base_fingerprint" not in ckpt and label is not None and (label == "ar") != (causal is True):
        raise CheckpointError(f"{path} says it was trained with objective {label}, but its model is "
                              f"{'causal' if causal else 'bidirectional'}")
    ckpt["model"] = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    return ckpt


def _first_line(error, width):
    """`TypeName: first line of the message`, cut to width: errors with no message included."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0][:width]}" if lines else type(error).__name__


def kind_of(ckpt):
    """What a checkpoint holds: 'head' (train_head.py), or the base's objective, 'mdlm',
    'proseco' or 'ar' (the autoregressive reference). The model's own causal flag decides
    when the config names no objective (load_checkpoint refuses the two disagreeing)."""
    if "base_fingerprint" in ckpt:
        return "head"
    causal = ckpt.get("model_args", {}).get("causal", False) is True
    return ckpt.get("config", {}).get("objective") or ("ar" if causal else "mdlm")


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
    """A Transformer rebuilt from a checkpoint, in eval mode, refusing another tokenizer and any
    kind (see kind_of) not in `kinds`: a diffusion decoder never runs the AR model, nor the reverse."""
    ckpt = load_checkpoint(path, made_by)
    if kind_of(ckpt) not in kinds:
        raise CheckpointError(f"{path} holds {a_kind(kind_of(ckpt))} checkpoint; "
                              f"this needs {' or '.join(map(a_kind, kinds))} checkpoint")
    if tokenizer_id is not None and ckpt.get("tokenizer_id") != tokenizer_id:
        raise CheckpointError(f"{path} was trained with tokenizer {ckpt.get('tokenizer_id')}, "
                              f"this code builds tokenizer {tokenizer_id}")
    return rebuild(path, ckpt, Transformer, TransformerConfig), ckpt


def rebuild(path, ckpt, module_cls, config_cls):
    """module_cls(config_cls(**model_args)) with the checkpoint's weights, in eval mode;
    CheckpointError if the saved config or weights do not fit the class, found by counting
    parameters before anything is allocated (a config far larger than its weights costs nothing)."""
    try:
        config = config_cls(**ckpt["model_args"])
        expected, held = parameter_count(module_cls, config), sum(t.numel() for t in ckpt["model"].values())
        if expected != held:
            raise ValueError(f"its model_args make {expected:,} parameters, its weights hold {held:,}")
        module = module_cls(config)
        module.load_state_dict(ckpt["model"])
    except (TypeError, RuntimeError, KeyError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path} does not match {module_cls.__name__}: {_first_line(e, 160)}")
    return module.eval()


def parameter_count(module_cls, config):
    """The parameters (buffers too) of module_cls(config), counted on the meta device, so
    nothing is allocated: built with one and two layers and extrapolated to config.n_layer,
    so a huge n_layer costs nothing either. ValueError if the config cannot be built."""
    def count(n_layer):
        with torch.device("meta"):
            module = module_cls(dataclasses.replace(config, n_layer=n_layer))
        return sum(t.numel() for t in module.state_dict().values())
    one = count(1)
    return one + (config.n_layer - 1) * (count(2) - one)


def check_fits(n_params, device, bytes_per_param, what):
    """ValueError, before any allocation, if n_params parameters at bytes_per_param (4 to
    decode in fp32; 16 to train: weights, gradients and AdamW's two moments) cannot fit in
    the device's memory."""
    need = n_params * bytes_per_param
    if device.startswith("cuda"):
        have = torch.cuda.get_device_properties(torch.device(device)).total_memory
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise ValueError(f"{what} make a model of {n_params:,} parameters: about {need / 2 ** 30:,.0f} GiB, "
                         f"more than the {have / 2 ** 30:,.0f} GiB this {device} has")


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
def interruptible(message="interrupted"):
    """A script's main, where Ctrl-C and SIGTERM alike raise KeyboardInterrupt wherever they
    land (a training loop catches it to save first); one that reaches here ends the script
    with `message` and exit status 130, never a traceback."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.default_int_handler)
    try:
        yield
    except KeyboardInterrupt:
        for s in (signal.SIGINT, signal.SIGTERM):  # a second signal must not interrupt the exit
            signal.signal(s, signal.SIG_IGN)
        print(message)  # on stdout, as the training loops report their own interruption
        sys.exit(130)


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


# -----------------------------------------------------------------------------
# decoding a list of problems, the diffusion decoders and the AR twin alike


def by_width(enc, problems, batch_size, decode, device):
    """Run decode((n, P) prompt ids) -> (tokens, passes per row) over the problems in
    batches of prompts of one width, the layout the model was trained on; returns
    (response texts, passes per problem) in the problems' order."""
    responses, passes = [None] * len(problems), [0] * len(problems)
    encoded, widths = [data.encode_prompt(enc, p.prompt) for p in problems], {}
    for i, ids in enumerate(encoded):
        widths.setdefault(len(ids), []).append(i)
    for rows in widths.values():
        for j in range(0, len(rows), batch_size):
            chunk = rows[j:j + batch_size]
            out, row_passes = decode(torch.tensor([encoded[i] for i in chunk], device=device))
            for i, row, n in zip(chunk, out, row_passes.tolist()):
                responses[i], passes[i] = data.decode_response(enc, row[-data.GEN_LEN:].tolist()), n
    return responses, passes
