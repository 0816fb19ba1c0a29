"""
The autoregressive (AR) reference: the same network as the diffusion base
(model.Transformer, its size and data), with causal attention, trained on next-token
cross-entropy and decoded left to right, one token per pass. It is what a reader
will ask the diffusion model to beat: an AR decoder makes no dependency errors
by construction (each token is chosen knowing every token before it), at the
price of one pass per token; the diffusion model reveals several tokens per pass
and must then correct the mixtures that come of it.

    python train_base.py --objective ar   # trains it -> out/ar.pt

Positions: Transformer.forward counts positions back from the canvas end, so the AR model
is trained on the whole prompt + GEN_LEN canvas (the logits at column i predict
column i + 1) and decoded on a canvas of the same width: every token has the same
position when trained on and when decoded.
"""

import torch
import torch.nn.functional as F

import data
from common import by_width, load_model
from model import KVCache


def ar_loss(model, x0, prompt_len):
    """Next-token cross-entropy on the response: token i predicted from the tokens
    before it, for every i >= prompt_len, mean over those positions. The whole canvas
    goes in (the last column's logits are unused) so positions are those of decoding."""
    logits = model(x0)
    return F.cross_entropy(logits[:, prompt_len - 1:-1].float().transpose(1, 2), x0[:, prompt_len:])


def load_ar(path, tokenizer_id=None):
    """(model, checkpoint) of an AR checkpoint, refusing a diffusion one in one line."""
    return load_model(path, tokenizer_id, made_by="python train_base.py --objective ar", kinds=("ar",))


@torch.no_grad()
def generate(model, prompt_ids, eos_id=None, cache=True):
    """Greedy decoding of GEN_LEN response tokens after (B, P) prompt ids; the model
    should be in eval mode. Returns (tokens (B, P + GEN_LEN), forward passes per row (B,)).

    cache=True: one pass over the prompt (it gives the first token), then one
    single-token pass per new token, reading the keys and values cached so far.
    cache=False, the reference: every step reruns the whole canvas; the columns after
    the prefix cannot reach it (causal attention), so this is the prefix's forward
    pass, with Transformer.forward's own positions. With eos_id, a row that has produced EOS
    is filled with EOS and stops costing passes. The mask token is never produced
    (Transformer's never_mask)."""
    if not model.config.causal:
        raise ValueError("autoregressive decoding needs a causal model (train_base.py --objective ar)")
    B, P = prompt_ids.shape
    width = P + data.GEN_LEN
    fill = model.config.mask_id if eos_id is None else eos_id  # not yet written, or after the answer's end
    x = torch.cat([prompt_ids, torch.full((B, data.GEN_LEN), fill, device=prompt_ids.device)], dim=1)
    passes = torch.zeros(B, dtype=torch.long, device=x.device)
    active = torch.ones(B, dtype=torch.bool, device=x.device)
    kv = KVCache(width)  # the keys and values of every column fed so far
    for i in range(P, width):  # column i is predicted from columns < i
        if not cache:
            logits = model(x)[:, i - 1]
        elif i == P:
            logits = model(x[:, :P], cache=kv)[:, -1]
        else:
            logits = model(x[:, i - 1:i], cache=kv, start=i - 1)[:, -1]
        token = logits.argmax(-1)
        passes += active
        x[:, i] = torch.where(active, token, fill)
        if eos_id is not None:
            active &= token != eos_id
            if not active.any():  # one host sync per token: every answer has ended
                break
    return x, passes


def decode_problems(model, enc, problems, batch_size=256, cache=True):
    """Greedy AR answers to each problem, EOS stop; returns (response texts, forward
    passes per problem)."""
    return by_width(enc, problems, batch_size, lambda prompts: generate(model, prompts, enc.eos, cache),
                    next(model.parameters()).device)


def flops_per_answer(model, prompt_len, passes):
    """Forward FLOPs of the cached decoder to answer one prompt of prompt_len columns in
    `passes` forward passes, counted as Transformer.pass_flops counts them: the n passes feed
    T = P + n - 1 tokens once each (the last token produced is never fed), each
    attending to itself and those before it: 2N * T + 4 * n_layer * n_embd * T(T + 1)/2.
    Count each answer, then average: the count is not linear in passes."""
    c, tokens = model.config, prompt_len + passes - 1
    return 2 * model.num_params() * tokens + 4 * c.n_layer * c.n_embd * tokens * (tokens + 1) / 2
