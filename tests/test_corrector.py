import random

import torch

import data
from corrector import fca_drafts
from train_head import auroc


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


def test_fca_extra_only_drafts_only_where_x_t_shows_a_token(tiny_model, enc):
    """Same draws, with and without extra_only: the default canvas shows x_t's tokens and
    drafts, some in positions x_t hides; with extra_only the canvas hides all x_t hides."""
    x0 = data.get_batch(enc, 16, random.Random(0))[0]
    P = x0.shape[1] - data.GEN_LEN
    runs = {}
    for extra_only in (False, True):
        torch.manual_seed(0)
        runs[extra_only] = fca_drafts(tiny_model, x0, P, n_drafts=4, dt=1 / 32, extra_only=extra_only)[2:]
    (drafted, visible), (drafted_extra, x_t_shows) = runs[False], runs[True]
    assert drafted_extra.any() and not (drafted_extra & ~x_t_shows).any()
    assert torch.equal(visible, x_t_shows | drafted) and (drafted & ~x_t_shows).any()


def test_auroc_matches_definition():
    assert auroc(torch.tensor([0.9, 0.8, 0.1, 0.2]), torch.tensor([1, 1, 0, 0])) == 1.0
    assert auroc(torch.tensor([0.1, 0.9, 0.5, 0.5]), torch.tensor([1, 0, 1, 0])) == 0.125


class AlwaysWrites:
    """A stand-in base that drafts the same response, `answer`, whatever its canvas shows."""

    def __init__(self, answer, vocab_size):
        self.answer, self.config = answer, type("Config", (), {"mask_id": vocab_size - 1})()
        self.vocab_size = vocab_size

    def __call__(self, x, return_hidden=False):
        logits = torch.full((*x.shape, self.vocab_size), -10.0)
        logits[:, -data.GEN_LEN:].scatter_(-1, self.answer.expand(len(x), -1)[..., None], 10.0)
        return (logits, torch.zeros(*x.shape, 4)) if return_hidden else logits


def test_a_draft_of_another_valid_answer_is_wrong_exactly_where_a_ground_truth_token_rules_it_out(enc):
    """x0 holds answer B; the drafts all come from answer A (differing from B everywhere).
    Against x0 every draft is wrong; against both answers, a row's drafts are right only
    while the canvas shows no ground-truth token of B, however many drafts there are:
    the drafts never outvote the ground truth."""
    torch.manual_seed(0)
    x0 = data.get_batch(enc, 64, random.Random(0))[1][:1].expand(512, -1).clone()  # one code problem, 512 rows
    P = x0.shape[1] - data.GEN_LEN
    b = x0[:, P:]
    a = (b + 1) % enc.mask  # never the mask id, never equal to b
    base = AlwaysWrites(a[0], vocab_size=enc.mask + 1)
    _, wrong_x0, drafted, _ = fca_drafts(base, x0, P, n_drafts=8, dt=1 / 32)
    assert (wrong_x0 == drafted).all()
    torch.manual_seed(0)
    _, wrong, drafted, visible = fca_drafts(base, x0, P, n_drafts=8, dt=1 / 32, references=torch.stack([b, a], 1))
    shown_b = (visible & ~drafted)[:, P:].sum(1)
    assert (shown_b == 0).any() and (drafted.sum(1) > shown_b).any() and (shown_b > 0).any(), "every case occurs"
    assert not wrong[shown_b == 0].any(), "a draft of A was wrong on a canvas that rules nothing out"
    assert torch.equal(wrong[shown_b > 0], drafted[shown_b > 0]), "a draft of A was right beside a token of B"


def test_without_references_a_draft_is_wrong_exactly_where_it_differs_from_x0(enc):
    x0 = data.get_batch(enc, 64, random.Random(0))[1][:1].expand(16, -1).clone()  # one code problem, 16 rows
    P = x0.shape[1] - data.GEN_LEN
    answer = x0[0, P:].clone()
    answer[::2] = (answer[::2] + 1) % enc.mask  # the base drafts x0's response, every other token changed
    torch.manual_seed(0)
    _, wrong, drafted, _ = fca_drafts(AlwaysWrites(answer, enc.mask + 1), x0, P, n_drafts=data.GEN_LEN, dt=1 / 32)
    differs = torch.zeros_like(drafted)
    differs[:, P:] = answer != x0[:, P:]
    assert (drafted & differs).any() and (drafted & ~differs).any(), "the drafts hold both kinds"
    assert torch.equal(wrong, drafted & differs), "a draft equal to x0 is right, one differing from x0 wrong"


def test_between_two_answers_the_drafts_fit_equally_x0_is_the_one_they_are_judged_against(enc):
    """Answers A and B (x0) differ at two positions; the drafts agree with A at the first
    and with B at the second. Where both are drafted, A and B each contradict one draft:
    the tie goes to x0, so the first draft is the wrong one."""
    torch.manual_seed(0)
    x0 = data.get_batch(enc, 64, random.Random(0))[1][:1].expand(256, -1).clone()
    P = x0.shape[1] - data.GEN_LEN
    b = x0[0, P:]
    a, draft = b.clone(), b.clone()
    a[0], a[1] = (b[0] + 1) % enc.mask, (b[1] + 1) % enc.mask
    draft[0] = a[0]
    references = torch.stack([a, b])[None].expand(256, -1, -1)  # A first: argmin alone would pick it
    _, wrong, drafted, _ = fca_drafts(AlwaysWrites(draft, enc.mask + 1), x0, P, n_drafts=data.GEN_LEN, dt=1 / 32,
                                      references=references)
    both = drafted[:, P] & drafted[:, P + 1]
    assert both.any(), "no row drafted both positions: the test proves nothing"
    assert wrong[both, P].all() and not wrong[both, P + 1].any(), "the tie did not go to x0"
