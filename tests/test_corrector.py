import random

import torch

import data
from corrector import CorrectionHead, HeadConfig, auroc, fca_drafts, random_remask, remask
from sample import generate


def test_remask_respects_tau_budget_and_fifo():
    p_wrong = torch.tensor([[0.9, 0.8, 0.95, 0.2, 0.99]])
    revealed = torch.tensor([[True, True, True, True, False]])
    stamps = torch.zeros(1, 5, dtype=torch.long)
    chosen, stamps = remask(p_wrong, revealed, stamps, tau=0.5, max_remask=2, fifo_len=2)
    assert chosen.tolist() == [[True, False, True, False, False]]  # the 2 most likely wrong, revealed, above tau
    chosen, stamps = remask(p_wrong, revealed, stamps, tau=0.5, max_remask=2, fifo_len=2)
    assert chosen.tolist() == [[False, True, False, False, False]]  # the last 2 sent back are skipped
    chosen, _ = remask(p_wrong, revealed, stamps, tau=0.5, max_remask=2, fifo_len=2)
    assert chosen.tolist() == [[True, False, False, False, False]]  # position 0 has left the FIFO


def test_random_control_sends_back_the_asked_count():
    revealed = torch.rand(4, 20) < 0.5
    chosen = random_remask(revealed, torch.tensor([0, 1, 2, 3]))
    assert (chosen & ~revealed).sum() == 0
    assert chosen.sum(1).tolist() == [min(c, r) for c, r in zip([0, 1, 2, 3], revealed.sum(1).tolist())]


def test_head_keeps_the_step_budget_and_never_remasks_on_the_last_step(tiny_model, enc):
    head = CorrectionHead(HeadConfig(n_embd_in=tiny_model.config.n_embd, tau=0.0)).eval()  # remasks all it may
    p = torch.tensor([data.encode_prompt(enc, q.prompt) for q in data.fixed_problems("code", "test", 2)])
    back = []
    out, passes = generate(tiny_model, p, data.GEN_LEN, 8, head=head, on_step=lambda s, x, b: back.append(b.sum().item()))
    assert passes == 8 and not (out == enc.mask).any()
    assert sum(back[:-1]) > 0 and back[-1] == 0
    _, passes = generate(tiny_model, p, data.GEN_LEN, 8, head=head, extend=True)
    assert passes > 8  # the paper's variant: corrections add forward passes, and they are counted


def test_at_one_token_per_step_the_head_checks_every_fourth_step(tiny_model, enc):
    head = CorrectionHead(HeadConfig(n_embd_in=tiny_model.config.n_embd, tau=0.0, check_every=4)).eval()
    p = torch.tensor([data.encode_prompt(enc, q.prompt) for q in data.fixed_problems("code", "test", 2)])
    back = []
    generate(tiny_model, p, data.GEN_LEN, data.GEN_LEN, block_len=16, head=head,
             on_step=lambda s, x, b: back.append(b.sum().item()))
    assert [i % 16 for i, n in enumerate(back) if n] == [3, 7, 11] * 2  # never on a block's last step (15)


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
