"""
ProSeCo's sampler (METHOD.md section 4): one network trained to unmask and to
correct (model.proseco_loss), decoded with a corrector loop between unmasking
steps, in the authors' order. At every step:
  1. a fresh predictor pass on the canvas with its masks (sample.generate);
  2. every `every` steps of a block, and at its last step, the corrector loop:
     y = the committed tokens, the predictor's argmax at every mask; then up to
     max_passes times y <- argmax model(y), stopping at a fixed point; the result
     is written back only into committed positions (earlier blocks included) and
     its logits replace the predictor's for this step;
  3. this step's tokens revealed from those logits, by the reveal rule.
Passes are predictor + corrector passes; the corrector's are counted apart.
"""

import torch


class ProSeCoCorrector:
    def __init__(self, max_passes=1, every=1):
        if max_passes < 1 or every < 1:
            raise ValueError(f"ProSeCo needs at least one corrector pass every step or more, got S={max_passes}, "
                             f"omega={every}")
        self.max_passes, self.every = max_passes, every

    def start(self, x):
        """Reset the per-row count of corrector passes for a new decode."""
        self.passes = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)

    def due(self, step_in_block, last_step):
        return last_step or (step_in_block + 1) % self.every == 0

    def __call__(self, model, x, logits, hidden, open_, active):
        """The corrector loop on rows still decoding; returns (x, logits, hidden)."""
        mask_id = model.config.mask_id
        committed = (x != mask_id) & open_
        y = torch.where(x == mask_id, logits.argmax(-1), x)  # every mask, later blocks too: the predictor's argmax
        changing = active.clone()
        for _ in range(self.max_passes):
            self.passes += changing  # a row that reached its fixed point costs nothing more
            out_logits, out_hidden = model(y, return_hidden=True)
            y_next = torch.where(open_, out_logits.argmax(-1), y)
            logits = torch.where(changing[:, None, None], out_logits, logits)
            hidden = torch.where(changing[:, None, None], out_hidden, hidden)
            changing &= (y_next != y).any(1)
            y = torch.where(changing[:, None], y_next, y)
            if not changing.any():  # every row at a fixed point: more passes would change nothing
                break
        x = torch.where(committed & active[:, None], logits.argmax(-1), x)
        return x, logits, hidden

    def __str__(self):
        return f"proseco(S={self.max_passes}, omega={self.every})"
