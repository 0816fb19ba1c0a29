"""
ProSeCo (METHOD.md section 4): one network trained to unmask and to correct,
decoded with a corrector loop between unmasking steps. Both halves live here.

Training (proseco_loss, as the authors' released script runs it): the masked
loss on x_t, then a second pass on y, the model's own argmax reconstruction
(no gradient through it), trained to give x0 back at every response position.
The corrector term is weighted by 1/t like the masked one, and where y is
already right its loss is -p(x0), bounded, rather than -log p(x0): errors weigh
more, so the corrector learns to fix rather than to copy. t in [0.1, 1).

Sampling (ProSeCoCorrector, in the authors' order). At every step:
  1. a fresh predictor pass on the canvas with its masks (sample.generate);
  2. every `every` steps of a block, and at its last step, the corrector loop:
     y = the committed tokens, the predictor's argmax at every mask; then up to
     max_passes times y <- argmax model(y), stopping at a fixed point; the result
     is written back only into committed positions (earlier blocks included) and
     its logits replace the predictor's for this step;
  3. this step's tokens revealed from those logits, by the reveal rule.
Passes are predictor + corrector passes; the loop returns its own, which eval.py
reports apart.
"""

import torch
import torch.nn.functional as F

import data
from model import masked_diffusion_loss
from sample import FixedSchedule

# Where the corrector's training input shows the model's argmax (CORRECTOR_INPUT below):
#   "all"     every response position, visible ones included (the authors' released script)
#   "masked"  only the positions x_t masked; the others keep x0 (their code's default)
CORRECTOR_INPUTS = ("all", "masked")
CORRECTOR_INPUT = "all"  # level with "masked" on validation (docs/LOG.md), so the released script's choice


def proseco_loss(model, x0, prompt_len, mask_id, elbo_weight=False, corrector_input=CORRECTOR_INPUT):
    """The masked loss (the base's, masked_diffusion_loss) plus the corrector term: the model maps
    its own argmax reconstruction y back to x0 at every response position, each
    token weighted by 1/t, summed and divided by the response tokens (the released
    normalisation; next to the base's mean over masked tokens it has the released
    relative scale, as that mean is the 1/t-weighted sum in expectation)."""
    unmask, logits, t, masked = masked_diffusion_loss(model, x0, prompt_len, mask_id, elbo_weight, t_low=0.1)
    is_response = (torch.arange(x0.shape[1], device=x0.device) >= prompt_len).expand_as(x0)
    shown = is_response if corrector_input == "all" else masked
    y = torch.where(shown, logits.detach().argmax(-1), x0)
    logp = F.log_softmax(model(y).float(), dim=-1).gather(-1, x0[..., None]).squeeze(-1)
    per_token = torch.where(y != x0, -logp, -logp.exp())  # errors upweighted: a right input costs -p(x0) only
    corrector = (per_token * is_response / t[:, None]).sum() / (x0.shape[0] * (x0.shape[1] - prompt_len))
    return unmask + corrector


class ProSeCoCorrector:
    def __init__(self, max_passes=1, every=1):
        if max_passes < 1 or every < 1:
            raise ValueError(f"ProSeCo needs at least one corrector pass every step or more, got S={max_passes}, "
                             f"omega={every}")
        self.max_passes, self.every = max_passes, every

    def due(self, step_in_block, last_step):
        return last_step or (step_in_block + 1) % self.every == 0

    def __call__(self, model, x, logits, hidden, open_, active):
        """The corrector loop on rows still decoding; returns (x, logits, hidden, its
        passes per row (B,))."""
        mask_id = model.config.mask_id
        committed = (x != mask_id) & open_
        y = torch.where(x == mask_id, logits.argmax(-1), x)  # every mask, later blocks too: the predictor's argmax
        changing, passes = active.clone(), torch.zeros_like(active, dtype=torch.long)
        for _ in range(self.max_passes):
            passes += changing  # a row that reached its fixed point costs nothing more
            out_logits, out_hidden = model(y, return_hidden=True)
            y_next = torch.where(open_, out_logits.argmax(-1), y)
            logits = torch.where(changing[:, None, None], out_logits, logits)
            hidden = torch.where(changing[:, None, None], out_hidden, hidden)
            changing &= (y_next != y).any(1)
            y = torch.where(changing[:, None], y_next, y)
            if not changing.any():  # every row at a fixed point: more passes would change nothing
                break
        x = torch.where(committed & active[:, None], logits.argmax(-1), x)
        return x, logits, hidden, passes

    def __str__(self):
        return f"proseco(S={self.max_passes}, omega={self.every})"


def equal_passes_rule(tokens_per_step, block_len):
    """ProSeCo at the others' total passes: twice the tokens per step, so that a
    corrector pass after each predictor pass (S=1, every step) fits the budget of
    GEN_LEN / tokens_per_step; None where no such schedule exists."""
    rule = FixedSchedule(data.GEN_LEN // (2 * tokens_per_step))
    try:
        rule.steps_per_block(data.GEN_LEN, block_len)
    except ValueError:
        return None
    return rule
