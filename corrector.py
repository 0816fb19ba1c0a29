"""
DSC, Decoupled Self-Correction (METHOD.md section 3): a small head over the
frozen base's penultimate hidden states that says which revealed tokens are wrong.

    CorrectionHead  a few bidirectional blocks -> one logit per position,
                    the logit of P(this token is wrong)  (ours: the direction)
    fca_drafts      training examples: the frozen base's own drafts, made with
                    poorer context and judged in richer context (Future-Context
                    Augmentation); fca=False is the no-FCA (PRISM-style) ablation
    balanced_bce    the head's loss: drafts only, wrong and right weighed equally

How the head is used at inference (tau, K, the check cadence) is decoding
policy, not architecture: remasking.HeadRemask.
"""

import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from common import CheckpointError, load_checkpoint, rebuild
from model import Block, mask_response, most_confident, propose


@dataclass
class HeadConfig:
    n_embd_in: int = 192  # the base's width
    width: int = 64  # small on purpose: the head must cost little per decoding step
    n_layer: int = 2
    n_head: int = 4


class CorrectionHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.proj_in = nn.Linear(config.n_embd_in, config.width)
        self.blocks = nn.ModuleList(Block(config.width, config.n_head) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.width)
        self.out = nn.Linear(config.width, 1)

    def forward(self, hidden):
        """Logit of P(token is wrong), (B, T), from the base's penultimate hidden states (B, T, C)."""
        x = self.proj_in(hidden)
        for block in self.blocks:
            x = block(x)
        return self.out(self.ln_f(x)).squeeze(-1)


@torch.no_grad()
def fca_drafts(base, x0, prompt_len, n_drafts, dt, fca=True, temperature=1.0, references=None, extra_only=False):
    """One batch of head-training examples from the frozen base's own drafts.

    FCA (METHOD.md 3): draw t in [0, 1 - dt) and t' in [dt, 1 - t]; mask x0 at
    rate t -> x_t; mask x_t further -> x_{t+t'}; the base drafts the n_drafts most
    confident masked positions of x_{t+t'} (sampled tokens; all of them when fewer
    are masked; with extra_only, only among those x_t shows); the drafts are
    spliced into the richer x_t -> z. dt is small, so t covers nearly the whole
    range and the head trains on canvases from nearly empty to nearly full, as it
    judges them while decoding; the draft count is set apart from dt, so a row still
    yields enough wrong drafts to learn from.
    With fca=False the drafts are made from x_t itself.

    Labels: a draft is wrong where it differs from x0, or, given `references` (B, R,
    GEN_LEN), every valid response of each row's prompt, where it differs from the
    valid response that agrees with every ground-truth token z shows (x0 always
    does) and, among those, with the most drafts (ties: x0): a prompt has several
    valid answers, and a draft from another one is not an error while nothing on
    the canvas rules that answer out; the drafts never outvote the ground truth.
    Returns (hidden states of the base on z, labels: 1 where a draft is wrong,
    drafted: the positions drafted, visible: every revealed response position of z)."""
    B, T = x0.shape
    mask_id = base.config.mask_id
    t = (1 - dt) * torch.rand(B, device=x0.device)
    x_t, _ = mask_response(x0, prompt_len, t, mask_id)
    draft_from = x_t
    if fca:  # each visible response token of x_t is masked with prob t'/(1-t): rate t + t' overall
        t_more = dt + (1 - t - dt) * torch.rand(B, device=x0.device)
        more, _ = mask_response(x_t, prompt_len, t_more / (1 - t), mask_id)
        draft_from = more
    x_hat, confidence = propose(base(draft_from), temperature)
    k = torch.full((B,), n_drafts, device=x0.device)
    candidates = draft_from == mask_id
    if extra_only:  # only the positions x_t shows and x_{t+t'} hides (the reimplementations differ)
        candidates &= x_t != mask_id
    drafted = most_confident(confidence, candidates, k)
    z = torch.where(drafted, x_hat, x_t)  # drafts now sit among x_t's ground-truth context
    _, hidden = base(z, return_hidden=True)
    visible = (z != mask_id) & (torch.arange(T, device=z.device) >= prompt_len)
    target = x0
    if references is not None:
        truth, drafts = (visible & ~drafted)[:, None, prompt_len:], drafted[:, None, prompt_len:]
        differs = references != z[:, None, prompt_len:]
        consistent = ~(differs & truth).any(-1)  # (B, R): agrees with every ground-truth token shown
        is_x0 = (references == x0[:, None, prompt_len:]).all(-1)
        score = 2 * (differs & drafts).sum(-1) + ~is_x0  # fewest drafts contradicted; ties go to x0
        closest = torch.where(consistent, score, 2 * T + 2).argmin(1)
        target = torch.cat([x0[:, :prompt_len], references[torch.arange(B, device=z.device), closest]], dim=1)
    return hidden, (z != target) & drafted, drafted, visible


def balanced_bce(logits, labels, where):
    """BCE averaged over wrong and right tokens separately, then halved: the rare
    'wrong' class weighs as much as the common 'right' one (the head must not learn 'never wrong')."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
    pos, neg = (labels & where).float(), (~labels & where).float()
    return 0.5 * (loss * pos).sum() / pos.sum().clamp(min=1) + 0.5 * (loss * neg).sum() / neg.sum().clamp(min=1)


class OtherBase(CheckpointError):
    """A head trained on another base than the one it is asked to correct."""


def load_head(path, base_fingerprint=None, made_by="python train_head.py"):
    """A CorrectionHead from its checkpoint, refusing one trained on another base
    (made_by: the command that trains this head again)."""
    ckpt = load_checkpoint(path, made_by=made_by)
    if base_fingerprint is not None and ckpt.get("base_fingerprint") != base_fingerprint:
        raise OtherBase(f"{path} was trained on base {ckpt.get('base_fingerprint')}, but the base "
                              f"loaded is {base_fingerprint}; retrain it with `{made_by}`")
    return rebuild(path, ckpt, CorrectionHead, HeadConfig), ckpt


@torch.no_grad()
def step_time(base, head, enc, batch_size, repeats=30):
    """Median milliseconds of the base forward pass and of the head on its hidden states."""
    device = next(base.parameters()).device
    prompts = data.encode_prompts(enc, [p.prompt for p in data.fixed_problems("code", "test", batch_size)])
    x = torch.cat([prompts, torch.full((batch_size, data.GEN_LEN), enc.mask)], dim=1).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None  # GPU work is asynchronous
    base_t, head_t = [], []
    for _ in range(repeats + 3):
        sync()
        t0 = time.perf_counter()
        _, hidden = base(x, return_hidden=True)
        sync()
        t1 = time.perf_counter()
        torch.sigmoid(head(hidden).float())
        sync()
        t2 = time.perf_counter()
        base_t.append(t1 - t0)
        head_t.append(t2 - t1)
    median = lambda v: sorted(v[3:])[len(v[3:]) // 2] * 1000  # noqa: E731 (first 3 are warm-up)
    return median(base_t), median(head_t)
