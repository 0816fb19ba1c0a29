import random

import pytest
import torch

import data
from model import (GPT, CheckpointError, load_checkpoint, load_model, mask_response, mdlm_loss, save_checkpoint)
from conftest import tiny_config


def test_attention_is_bidirectional(tiny_model):
    x = torch.randint(0, 100, (1, data.PROMPT_LEN + data.GEN_LEN))
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % 100  # change only the last token
    assert not torch.allclose(tiny_model(x)[0, 0], tiny_model(y)[0, 0])  # the first position sees it


def test_prompt_is_never_masked(enc):
    x0 = data.get_batch(enc, 16, random.Random(0))
    xt, masked = mask_response(x0, data.PROMPT_LEN, torch.ones(16), enc.mask)
    assert (xt[:, :data.PROMPT_LEN] == x0[:, :data.PROMPT_LEN]).all()
    assert (xt[:, data.PROMPT_LEN:] == enc.mask).all()  # t=1: every response token masked


def test_mask_token_is_never_predicted(tiny_model):
    logits = tiny_model(torch.randint(0, 100, (2, data.PROMPT_LEN + data.GEN_LEN)))
    assert torch.isneginf(logits[..., tiny_model.config.mask_id]).all()


def test_loss_counts_only_masked_response_positions(tiny_model, enc):
    x0 = data.get_batch(enc, 4, random.Random(0))
    torch.manual_seed(0)
    loss, logits, t, masked = mdlm_loss(tiny_model, x0, data.PROMPT_LEN)
    assert not masked[:, :data.PROMPT_LEN].any() and masked.any()
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x0, reduction="none")
    assert torch.allclose(loss, ce[masked].mean())
    torch.manual_seed(0)
    elbo, _, t, masked = mdlm_loss(tiny_model, x0, data.PROMPT_LEN, elbo_weight=True)
    assert torch.allclose(elbo, (ce * masked / t[:, None]).sum() / (4 * data.GEN_LEN))


def test_tiny_model_overfits_a_handful_of_examples(enc):
    from sample import generate
    torch.manual_seed(0)
    rng = random.Random(0)
    problems = [data.sample_problem("math", "train", rng) for _ in range(4)]
    x0 = torch.tensor([data.encode_prompt(enc, p.prompt) + data.encode_response(enc, p.responses[0]) for p in problems])
    model = GPT(tiny_config(enc, n_embd=64))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = mdlm_loss(model, x0, data.PROMPT_LEN)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    out, _ = generate(model.eval(), x0[:, :data.PROMPT_LEN], data.GEN_LEN, steps=data.GEN_LEN)
    assert (out == x0).all()


def test_checkpoint_round_trips(tmp_path, tiny_model, enc):
    path = str(tmp_path / "ckpt.pt")
    state = {f"_orig_mod.{k}": v for k, v in tiny_model.state_dict().items()}  # as saved from a compiled model
    save_checkpoint(path, model=state, model_args=vars(tiny_model.config), tokenizer_id=data.tokenizer_id(enc),
                    iter=7, best_val=0.5)
    model, ckpt = load_model(path, data.tokenizer_id(enc))
    assert ckpt["iter"] == 7
    for (k, a), b in zip(tiny_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k


def test_missing_checkpoint_names_the_file_and_the_command(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt does not exist.*python train_base.py"):
        load_checkpoint(str(tmp_path / "nope.pt"), made_by="python train_base.py")
