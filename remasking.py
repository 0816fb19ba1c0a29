"""
Remasking policies: which revealed tokens a decoding step sends back to be
predicted again (the second of the decoder's two questions; the first, how many
masked tokens to reveal, is sample.py's reveal rule).

    NoRemask      LLaDA: a revealed token is final
    HeadRemask    DSC (METHOD.md section 3): the correction head's P(wrong) above
                  tau, at most K per check, a check once per check_every tokens
                  revealed, each position sent back at most once
    RandomRemask  the control: as many tokens as a recorded run sent back at
                  each row's each step, chosen at random
    ReMDMConf     ReMDM-conf (METHOD.md section 5), training-free: the noise
                  schedule's remasking budget, spent on the tokens revealed
                  with low confidence most often
    ReMDMLoop     ReMDM-loop: once a block is mostly revealed (LoopSchedule
                  gets it there early), each of its tokens goes back with prob. eta

A policy is settings plus functions of tensors. Its state (a dict of tensors,
one row per canvas) goes in and out of every step, so the step stays one
compiled graph and a policy object can be reused for any number of decodes:
    start(x)                                      -> state
    send_back(state, revealed, hidden, block, steps_left, gen) -> (bool (B, T), state)
    after_reveal(state, revealed_now, confidence)               -> state
`revealed` holds the positions a policy may send back this step: revealed
response tokens of rows still decoding, never the prompt, never a mask; `block`
(T,) marks the current block and `steps_left` counts this step among the block's
(1: its last, 0: the refill step, where nothing may go back).
"""

import torch

from common import CheckpointError
from corrector import load_head
from model import most_confident


class NoRemask:
    """LLaDA's sampler: nothing is ever sent back."""

    def start(self, x):
        return {}

    def send_back(self, state, revealed, hidden, block, steps_left, generator=None):
        return torch.zeros_like(revealed), state

    def after_reveal(self, state, revealed_now, confidence):
        return state

    def __str__(self):
        return "none"


class HeadRemask(NoRemask):
    """DSC's adaptive remasking with a trained CorrectionHead (corrector.py).

    Every check_every tokens revealed in a row (counted per row, so the cadence is
    the same at any number of tokens per step), the head scores the row's revealed
    tokens on the pre-reveal canvas of this step's forward pass (no extra base
    pass), and up to max_per_check with P(wrong) > tau go back, most likely wrong
    first. No position goes back more than max_per_position times: without that cap
    a token the head distrusts and the model keeps re-predicting loops, and under the
    threshold rule every send-back costs passes. (The paper skips a FIFO of the
    positions sent back most recently instead; a cap of one makes that FIFO idle.)"""

    def __init__(self, head, tau=0.5, max_per_check=2, check_every=4, max_per_position=1):
        whole = lambda v: type(v) is int and v >= 1  # noqa: E731
        for name, value, holds, want in [
                ("tau", tau, type(tau) in (int, float) and 0 <= tau <= 1, "a number from 0 to 1"),
                ("max_per_check", max_per_check, whole(max_per_check), "a whole number, at least 1"),
                ("check_every", check_every, whole(check_every), "a whole number, at least 1"),
                ("max_per_position", max_per_position, max_per_position is None or whole(max_per_position),
                 "None or a whole number, at least 1")]:
            if not holds:
                raise ValueError(f"{name} must be {want}, got {value!r}")
        self.head, self.tau, self.max_per_check = head, tau, max_per_check
        self.check_every, self.max_per_position = check_every, max_per_position
        self.bar = torch.tensor(tau)  # a tensor: a compiled step serves every tau

    def start(self, x):
        rows = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return {"times_sent": torch.zeros_like(x), "since_check": rows}

    def send_back(self, state, revealed, hidden, block, steps_left, generator=None):
        p_wrong = torch.sigmoid(self.head(hidden).float())
        due = state["since_check"] >= self.check_every
        eligible = revealed & due[:, None] & (p_wrong > self.bar)
        if self.max_per_position is not None:
            eligible &= state["times_sent"] < self.max_per_position
        chosen = most_confident(p_wrong, eligible, torch.full_like(due, self.max_per_check, dtype=torch.long))
        return chosen, {"times_sent": state["times_sent"] + chosen.long(),
                        "since_check": torch.where(due, 0, state["since_check"])}

    def after_reveal(self, state, revealed_now, confidence):
        return {**state, "since_check": state["since_check"] + revealed_now.sum(1)}

    def settings(self):
        """What a checkpoint or a report needs to rebuild this policy around a head."""
        return {"tau": self.tau, "max_per_check": self.max_per_check,
                "check_every": self.check_every, "max_per_position": self.max_per_position}

    def __str__(self):
        return "head(" + ", ".join(f"{k}={v}" for k, v in self.settings().items()) + ")"


def head_policy(path, base_fingerprint, made_by="python train_head.py", **overrides):
    """The DSC policy a head checkpoint holds: its CorrectionHead with the remasking settings
    saved beside it (picked on validation), `overrides` on top. CheckpointError naming the
    file where it does not fit the base or its settings are missing or cannot work."""
    head, ckpt = load_head(path, base_fingerprint, made_by)
    saved, known = ckpt.get("remasking"), HeadRemask(None).settings()
    if not isinstance(saved, dict) or set(saved) != set(known):
        odd = sorted(set(saved) ^ set(known)) if isinstance(saved, dict) else []
        raise CheckpointError(f"{path} holds no remasking settings of this project ({', '.join(known)})"
                              + (f": {', '.join(odd)} missing or unknown" if odd else f"; `{made_by}` saves them"))
    try:
        return HeadRemask(head, **{**saved, **overrides})
    except ValueError as e:
        raise CheckpointError(f"{path}: its remasking setting {e}") from None


class RandomRemask(NoRemask):
    """The control for a head: at its i-th step, row b sends back counts[i, b] of its
    revealed tokens, chosen uniformly at random, where counts (steps, B) is what the head
    sent back at that row's i-th step of a recorded run on the same problems
    (per_row_counts). A row's step counts when it reveals, as every row still decoding
    does, so rows that progress differently or end early keep their own schedule; what a
    step cannot send back (too few tokens revealed) is owed to the row's next step."""

    def __init__(self, counts):
        due = counts.cumsum(0)  # what a row owes by the end of each of its steps
        self.due = torch.cat([due, due[-1:]])  # the extra row: nothing more, forever after

    def start(self, x):
        rows = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return {"step": rows, "spent": rows}

    def send_back(self, state, revealed, hidden, block, steps_left, generator=None):
        step = state["step"].clamp(max=len(self.due) - 1)
        due = self.due.to(revealed.device)[step, torch.arange(len(step), device=step.device)]
        u = torch.rand(revealed.shape, device=revealed.device, generator=generator)
        chosen = most_confident(u, revealed, due - state["spent"])
        return chosen, {**state, "spent": state["spent"] + chosen.sum(1)}

    def after_reveal(self, state, revealed_now, confidence):
        return {**state, "step": state["step"] + revealed_now.any(1)}

    def __str__(self):
        return "random"


def per_row_counts(sent_back, active):
    """(steps, B) send-backs by step of the batch -> by each row's own step: entry [i, b]
    is what row b sent back at the i-th step it was active (zeros after its last)."""
    order = torch.argsort((~active).long(), dim=0, stable=True)  # each row's active steps first, in order
    return torch.where(active.gather(0, order), sent_back.gather(0, order), 0)


class ReMDMConf(NoRemask):
    """ReMDM-conf as the authors' code runs it, with each block as its sequence.

    At a step from block time t (the fraction of the block still masked) to s (the
    fraction the rule leaves: the rest spread over the steps left, s = t (1 - 1/steps_left)),
    the schedule allows sigma_max = min(1, s / (1 - t)) remasking; each revealed token of
    the block goes back with probability eta * sigma_max * softmax(-p), where p is the
    probability the model gave the token when it was revealed (their `conf` score, set at
    unmasking), over the block's revealed tokens. So about eta * sigma_max tokens per step,
    those revealed with the least confidence most often. The authors' eta is 1 (no knob);
    ours scales it, tuned on validation. Tokens sent back are owed like any masks (the
    reveal rule's budget), the counterpart of ReMDM raising the unmask probability."""

    def __init__(self, eta=1.0):
        self.eta = eta

    def start(self, x):
        return {"revealed_with": torch.zeros(x.shape, dtype=torch.float64, device=x.device)}

    def send_back(self, state, revealed, hidden, block, steps_left, generator=None):
        candidates = revealed & block
        t = (block & ~revealed).sum(1, keepdim=True) / block.sum()  # masked share of the block (rows decoding)
        s = t * (1 - 1 / steps_left.clamp(min=1))
        sigma_max = torch.where(t < 1, s / (1 - t).clamp(min=1e-9), 0.0).clamp(max=1.0)
        weight = torch.where(candidates, -state["revealed_with"], float("-inf")).softmax(dim=1).nan_to_num(0.0)
        p = (self.eta * sigma_max * weight).clamp(max=1.0)
        u = torch.rand(p.shape, dtype=p.dtype, device=p.device, generator=generator)
        return (u < p) & candidates, state

    def after_reveal(self, state, revealed_now, confidence):
        return {"revealed_with": torch.where(revealed_now, confidence, state["revealed_with"])}

    def __str__(self):
        return f"remdm-conf(eta={self.eta})"


class ReMDMLoop(NoRemask):
    """ReMDM-loop, with each block as its sequence: plain unmasking until the block is
    alpha_on revealed, then a loop in which each revealed token of the block goes back
    with probability eta at every step and as many masks are revealed, then the rest.
    The authors spend the first (1 - t_on) of the time reaching alpha_on and the loop
    from t_on down to t_off; LoopSchedule is that time grid as a reveal rule for a
    fixed budget of steps. Under any other rule the loop runs wherever a block is at least
    alpha_on revealed. Their settings: eta 0.02, alpha_on 0.9 (t_on 0.55, t_off 0.05)."""

    def __init__(self, eta=0.02, alpha_on=0.9):
        self.eta, self.alpha_on = eta, alpha_on

    def start(self, x):
        return {}

    def send_back(self, state, revealed, hidden, block, steps_left, generator=None):
        candidates = revealed & block
        masks_held = torch.ceil((1 - self.alpha_on) * block.sum() - 1e-6)  # as LoopSchedule rounds it
        looping = (block & ~revealed).sum(1, keepdim=True) <= masks_held
        u = torch.rand(candidates.shape, device=candidates.device, generator=generator)
        return (u < self.eta) & candidates & looping, state

    def __str__(self):
        return f"remdm-loop(eta={self.eta})"


class LoopSchedule:
    """ReMDM-loop's time grid as a reveal rule (sample.py's interface) over the n steps per
    block of a fixed schedule (`fixed`, a sample.FixedSchedule): the step from block time t
    to s = t - 1/n leaves the block revealed to alpha(s), where alpha rises linearly from 0
    at s = 1 to alpha_on at s = t_on, holds there (the loop: a step reveals as many tokens
    as went back) until t_off, and rises to 1 at s = 0."""

    def __init__(self, fixed, alpha_on=0.9, t_on=0.55, t_off=0.05):
        self.fixed, self.alpha_on, self.t_on, self.t_off = fixed, alpha_on, t_on, t_off

    def steps_per_block(self, gen_len, block_len):
        self.n, self.block_len = self.fixed.steps_per_block(gen_len, block_len), block_len
        return self.n

    def reveal(self, confidence, masked, owed, steps_left):
        s = (steps_left - 1).clamp(min=0) / self.n  # block time after this step
        alpha = torch.where(s >= self.t_on, (1 - s) * self.alpha_on / (1 - self.t_on),
                            torch.where(s > self.t_off, self.alpha_on, 1 - (1 - self.alpha_on) * s / self.t_off))
        keep = torch.ceil((1 - alpha) * self.block_len - 1e-6).long()  # masks the block holds after this step
        k = torch.where(steps_left <= 1, masked.sum(1), (owed - keep).clamp(min=0))
        return most_confident(confidence, masked, k)

    def __str__(self):
        return f"{self.fixed} on ReMDM-loop's time grid"
