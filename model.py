"""
The masked diffusion LM: a bidirectional nanoGPT-style transformer, the MDLM
training loss, and the one place checkpoints are saved and loaded.

No causal mask and no time conditioning (MDLM default, LLaDA): the model infers
how noisy its input is from the <|mask|> tokens it sees. forward() can also
return the penultimate block's hidden states, which the correction head reads.
"""

import hashlib
import math
import os
import signal
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 320  # tokenizer size; the last id is <|mask|>
    block_size: int = 80  # the widest canvas: PROMPT_LEN + GEN_LEN
    n_layer: int = 4
    n_head: int = 6
    n_embd: int = 192
    dropout: float = 0.0

    @property
    def mask_id(self):
        return self.vocab_size - 1


class SelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, dropout=0.0):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=False)  # bidirectional
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, n_embd, n_head, dropout=0.0):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = SelfAttention(n_embd, n_head, dropout)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd),
                                 nn.Dropout(dropout))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config.n_embd, config.n_head, config.dropout) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT
        # the mask token is never a valid prediction: -inf on its logit, everywhere
        never = torch.zeros(config.vocab_size)
        never[config.mask_id] = float("-inf")
        self.register_buffer("never_mask", never, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):  # GPT-2 scaled residual init
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, return_hidden=False):
        """Logits (B, T, V); with return_hidden also the penultimate block's output (B, T, C)."""
        # positions count back from the canvas end: a narrow canvas (a short prompt, fewer pad
        # columns) gives each response token the position it has on the widest one
        pos = torch.arange(self.config.block_size - idx.shape[1], self.config.block_size, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        hidden = x
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == len(self.blocks) - 2:
                hidden = x
        logits = self.lm_head(self.ln_f(x)) + self.never_mask
        return (logits, hidden) if return_hidden else logits

    def num_params(self):
        return sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()

    def flops_per_token(self):
        """Forward+backward FLOPs per token (6N plus attention), as nanoGPT's MFU estimate."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * c.block_size


# -----------------------------------------------------------------------------
# the diffusion forward process and loss (METHOD.md section 1)


def antithetic_t(batch_size, device, eps=1e-3, low=0.0):
    """Low-discrepancy t in [max(eps, low), 1): t_i = (u + i/B) mod 1, rescaled."""
    u = (torch.rand(1, device=device) + torch.arange(batch_size, device=device) / batch_size) % 1
    low = max(eps, low)
    return low + (1 - low) * u


def mask_response(x0, prompt_len, t, mask_id):
    """Forward process: each response token becomes <|mask|> with probability t; the prompt never does."""
    is_response = torch.arange(x0.shape[1], device=x0.device) >= prompt_len
    masked = (torch.rand(x0.shape, device=x0.device) < t[:, None]) & is_response
    return torch.where(masked, mask_id, x0), masked


def mdlm_loss(model, x0, prompt_len, mask_id, elbo_weight=False, t_low=0.0):
    """Masked diffusion loss. Default: mean cross-entropy over masked positions
    (measured here to learn far faster than the ELBO at this scale); with
    elbo_weight, the MDLM bound: CE weighted by 1/t, summed, over response tokens.
    Returns (loss, logits, t, masked) so a caller can build on this forward pass."""
    t = antithetic_t(x0.shape[0], x0.device, low=t_low)
    xt, masked = mask_response(x0, prompt_len, t, mask_id)
    logits = model(xt)
    ce = F.cross_entropy(logits.float().transpose(1, 2), x0, reduction="none")  # (B, T), dense: no indexing
    n_response = x0.shape[1] - prompt_len
    return weighted_ce(ce, masked, t, n_response, elbo_weight), logits, t, masked


def weighted_ce(ce, masked, t, n_response, elbo_weight):
    """The one weighting rule. ELBO: CE/t summed over masked tokens, per response
    token (MDLM, linear schedule). Default: plain mean CE over masked tokens."""
    w = masked.float()
    if elbo_weight:
        return (ce * w / t[:, None]).sum() / (ce.shape[0] * n_response)
    return (ce * w).sum() / w.sum().clamp(min=1)


def proseco_loss(model, x0, prompt_len, mask_id, elbo_weight=False):
    """ProSeCo (METHOD.md 4): the masked loss, plus a corrector term. The model's own
    argmax reconstruction y of every response position (no gradient through it,
    even where the input was visible) is fed back in, and the model must map y to
    x0 at every response position, weighted like the masked loss. t in [0.1, 1)."""
    unmask, logits, t, _ = mdlm_loss(model, x0, prompt_len, mask_id, elbo_weight, t_low=0.1)
    is_response = (torch.arange(x0.shape[1], device=x0.device) >= prompt_len).expand_as(x0)
    y = torch.where(is_response, logits.detach().argmax(-1), x0)
    ce = F.cross_entropy(model(y).float().transpose(1, 2), x0, reduction="none")
    return unmask + weighted_ce(ce, is_response, t, x0.shape[1] - prompt_len, elbo_weight)


# -----------------------------------------------------------------------------
# choosing tokens from logits: shared by the sampler and the FCA draft maker


def most_confident(confidence, candidates, k):
    """Boolean (B, T): for each row, the k[b] candidate positions of highest confidence."""
    conf = torch.where(candidates, confidence, float("-inf"))
    rank = conf.argsort(dim=1, descending=True).argsort(dim=1)  # 0 = most confident
    return (rank < k[:, None]) & candidates


def propose(logits, temperature, generator=None):
    """Candidate x0 (argmax, or Gumbel-max sample in float64) and its softmax probability."""
    logits = logits.double()
    if temperature > 0:
        u = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
        x0 = (logits / temperature - torch.log(-torch.log(u.clamp_min(1e-300)))).argmax(-1)
    else:
        x0 = logits.argmax(-1)
    return x0, logits.softmax(-1).gather(-1, x0[..., None]).squeeze(-1)


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
    """What a checkpoint holds: 'head' (train_head.py), or the base's objective, 'mdlm' or 'proseco'."""
    if "base_fingerprint" in ckpt:
        return "head"
    return (ckpt.get("config") or {}).get("objective", "mdlm")


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
            raise CheckpointError(f"{path} holds a {existing} checkpoint; this run writes a {kind} checkpoint")
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


def load_model(path, tokenizer_id=None, made_by="python train_base.py"):
    """A GPT rebuilt from a checkpoint, in eval mode, refusing another tokenizer."""
    ckpt = load_checkpoint(path, made_by)
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
