import random

import torch

import data
from corrector import auroc, fca_drafts


def test_fca_drafts_label_exactly_the_wrong_drafts(tiny_model, enc):
    torch.manual_seed(0)
    x0 = data.get_batch(enc, 16, random.Random(0))[0]
    P = x0.shape[1] - data.GEN_LEN
    for fca in (True, False):
        hidden, wrong, drafted = fca_drafts(tiny_model, x0, P, n_drafts=4, fca=fca)
        assert hidden.shape == (len(x0), x0.shape[1], tiny_model.config.n_embd)
        assert (drafted.sum(1) <= 4).all() and drafted.sum() > 0 and not drafted[:, :P].any()
        assert not (wrong & ~drafted).any() and wrong.any()  # an untrained base drafts wrong tokens


def test_auroc_matches_definition():
    assert auroc(torch.tensor([0.9, 0.8, 0.1, 0.2]), torch.tensor([1, 1, 0, 0])) == 1.0
    assert auroc(torch.tensor([0.1, 0.9, 0.5, 0.5]), torch.tensor([1, 0, 1, 0])) == 0.125
