import random

import torch

import data
from corrector import auroc, fca_drafts


def test_fca_drafts_label_exactly_the_wrong_drafts(tiny_model, enc):
    torch.manual_seed(0)
    x0 = data.get_batch(enc, 16, random.Random(0))[0]
    P = x0.shape[1] - data.GEN_LEN
    for fca in (True, False):
        hidden, wrong, drafted, visible = fca_drafts(tiny_model, x0, P, n_drafts=4, dt=1 / 32, fca=fca)
        assert hidden.shape == (len(x0), x0.shape[1], tiny_model.config.n_embd)
        assert (drafted.sum(1) <= 4).all() and drafted.sum() > 0 and not drafted[:, :P].any()
        assert not (wrong & ~drafted).any() and wrong.any()  # an untrained base drafts wrong tokens
        assert not (drafted & ~visible).any() and not visible[:, :P].any()


def test_fca_with_a_small_dt_trains_on_canvases_more_than_half_masked(tiny_model, enc):
    """dt sets the time range apart from the draft count: with dt = 1/32 the judged
    canvas z is often more than half masked; dt = 0.5 (the earlier construction) never is."""
    x0 = torch.cat([data.get_batch(enc, 64, random.Random(s))[1] for s in range(4)])
    P = x0.shape[1] - data.GEN_LEN
    for dt, expect_some in ((1 / 32, True), (0.5, False)):
        torch.manual_seed(0)
        _, _, drafted, visible = fca_drafts(tiny_model, x0, P, n_drafts=4, dt=dt)
        masked_fraction = 1 - visible[:, P:].float().mean(1)
        assert (masked_fraction > 0.6).any() == expect_some


def test_auroc_matches_definition():
    assert auroc(torch.tensor([0.9, 0.8, 0.1, 0.2]), torch.tensor([1, 1, 0, 0])) == 1.0
    assert auroc(torch.tensor([0.1, 0.9, 0.5, 0.5]), torch.tensor([1, 0, 1, 0])) == 0.125
