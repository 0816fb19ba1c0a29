"""
The masked diffusion LM: a bidirectional nanoGPT-style transformer (Transformer)
and the masked diffusion loss, mean cross-entropy over the masked tokens or, with
elbo_weight, MDLM's bound (checkpoints and training infrastructure live in common.py).

No causal mask and no time conditioning (MDLM default, LLaDA): the model infers
how noisy its input is from the <|mask|> tokens it sees. forward() can also
return the penultimate block's hidden states, which the correction head reads.
causal=True makes the same network the autoregressive reference (autoregressive.py).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class TransformerConfig:
    vocab_size: int = 320  # tokenizer size; the last id is <|mask|>
    block_size: int = 80  # the widest canvas: PROMPT_LEN + GEN_LEN
    n_layer: int = 4
    n_head: int = 6
    n_embd: int = 192
    dropout: float = 0.0
    causal: bool = False  # True: left-to-right attention, the autoregressive twin

    @property
    def mask_id(self):
        return self.vocab_size - 1


class KVCache:
    """The keys and values of every column of one canvas, per block, so that a forward
    pass can feed some of its columns and still attend to all of them (the model's
    forward(idx, cache=cache, start=s) feeds columns s .. s + T - 1). A pass writes the
    keys and values of the columns it feeds; the others keep those an earlier pass
    wrote. The AR twin feeds its prompt, then one column per pass, and attends only
    to columns up to each query's own: the cache is exact. The diffusion decoder feeds
    the whole canvas at a block's first step, then only a window of it: the columns
    outside the window keep the keys and values of that first step, which is Fast-dLLM's
    approximation (they would have attended to the window as it changed)."""

    def __init__(self, width):
        self.width, self.keys, self.values, self.hidden = width, [], [], None

    def update_hidden(self, start, hidden):
        """Write the penultimate block's outputs (B, T, C) of columns start .. start + T - 1;
        returns those of every column (a correction head reads the whole canvas)."""
        if self.hidden is None:
            self.hidden = hidden.new_zeros(hidden.shape[0], self.width, hidden.shape[2])
        self.hidden[:, start:start + hidden.shape[1]] = hidden
        return self.hidden

    def update(self, layer, start, k, v):
        """Write the keys and values (B, H, T, D) of columns start .. start + T - 1 into
        block `layer`'s cache; returns that block's keys and values of every column."""
        if layer == len(self.keys):  # the first pass: made here, in the dtype autocast gives k and v
            shape = (*k.shape[:2], self.width, k.shape[3])
            self.keys.append(k.new_zeros(shape))
            self.values.append(v.new_zeros(shape))
        self.keys[layer][:, :, start:start + k.shape[2]] = k
        self.values[layer][:, :, start:start + v.shape[2]] = v
        return self.keys[layer], self.values[layer]


class SelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, dropout=0.0, causal=False):
        super().__init__()
        if n_head < 1 or n_embd % n_head:
            raise ValueError(f"the width {n_embd} is not a multiple of the {n_head} attention heads")
        self.n_head, self.dropout, self.causal = n_head, dropout, causal
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x, cache=None, layer=0, start=0):
        """x (B, T, C) the columns fed. With a KVCache, they are columns start .. start + T - 1
        of its canvas, and attend to its other columns too: every column (bidirectional),
        or those up to their own (causal)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        drop = self.dropout if self.training else 0.0
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=self.causal)
        else:
            k, v = cache.update(layer, start, k, v)
            mask = None
            if self.causal:  # query i sits at column start + i: it sees columns 0 .. start + i
                k, v = k[:, :, :start + T], v[:, :, :start + T]
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, n_embd, n_head, dropout=0.0, causal=False):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = SelfAttention(n_embd, n_head, dropout, causal)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd),
                                 nn.Dropout(dropout))

    def forward(self, x, cache=None, layer=0, start=0):
        x = x + self.attn(self.ln1(x), cache, layer, start)
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """The network: a bidirectional denoiser that predicts every column's token from a
    partly masked canvas (causal=True: the autoregressive twin, next token at each column)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config.n_embd, config.n_head, config.dropout, config.causal)
                                    for _ in range(config.n_layer))
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

    def forward(self, idx, return_hidden=False, cache=None, start=0):
        """Logits (B, T, V); with return_hidden also the penultimate block's output (B, T, C).
        With a KVCache, idx (B, T) holds columns start .. start + T - 1 of the cache's canvas."""
        # positions count back from the canvas end: a narrow canvas (a short prompt, fewer pad
        # columns) gives each response token the position it has on the widest one
        width = idx.shape[1] if cache is None else cache.width
        pos = torch.arange(start, start + idx.shape[1], device=idx.device) + self.config.block_size - width
        x = self.wte(idx) + self.wpe(pos)
        hidden = x
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i, start)
            if i == len(self.blocks) - 2:
                hidden = x
        logits = self.lm_head(self.ln_f(x)) + self.never_mask
        return (logits, hidden) if return_hidden else logits

    def num_params(self):
        return sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()

    def flops_per_token(self):
        """Forward+backward FLOPs per token (6N plus attention), as nanoGPT's MFU estimate;
        a causal model attends to half the pairs on average."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * c.block_size // (2 if c.causal else 1)

    def pass_flops(self, fed, width):
        """Forward FLOPs of a diffusion pass that feeds `fed` columns of a canvas `width`
        wide, each attending to all of them (fed < width: the others from a KV cache),
        counted as nanoGPT counts them: 2N per token fed (N = num_params()) and
        4 * n_layer * n_embd per (query, key) pair attended (QK^T and AV, 2 * n_embd each).
        The base's passes only: a correction head's own (small) blocks are not counted."""
        return fed * (2 * self.num_params() + 4 * self.config.n_layer * self.config.n_embd * width)


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


def masked_diffusion_loss(model, x0, prompt_len, mask_id, elbo_weight=False, t_low=0.0):
    """Masked diffusion loss. Default: mean cross-entropy over masked positions
    (it learns far faster than the ELBO at this scale: its 1/t weight is noisy); with
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
