import dataclasses
import random

import pytest
import torch

import autoregressive
import data
from common import CheckpointError, kind_of, load_checkpoint, load_model, save_checkpoint
from conftest import TINY, one_line_error, tiny_config
from model import Transformer, KVCache


def causal_model(enc, std=None):
    """A tiny causal Transformer. With std, its matrices redrawn at that scale and the EOS logit
    doubled: a freshly initialised one repeats one token forever, and this one writes
    varied tokens and ends its answers at varied lengths, so EOS stopping is exercised."""
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(tiny_config(enc), causal=True)).eval()
    if std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, std)
            model.lm_head.weight[enc.eos] *= 2
    return model


def test_cached_decoding_gives_the_tokens_and_passes_of_uncached_decoding(enc):
    model = causal_model(enc, std=0.3).double()  # float64: no near-tie can flip an argmax between the two paths
    for task in data.TASKS:
        prompts = data.encode_prompts(enc, [p.prompt for p in data.fixed_problems(task, "val", 8)])
        cached, cached_passes = autoregressive.generate(model, prompts, eos_id=enc.eos)
        reference, passes = autoregressive.generate(model, prompts, eos_id=enc.eos, cache=False)
        assert torch.equal(cached, reference) and torch.equal(cached_passes, passes)
        assert (cached[:, :prompts.shape[1]] == prompts).all()
        response = cached[:, prompts.shape[1]:]
        assert 1 < len(set(passes.tolist())) and passes.min() < data.GEN_LEN  # rows end at varied lengths
        for row, n in zip(response, passes.tolist()):  # a row's passes: its tokens up to and including its EOS
            assert (row[n:] == enc.eos).all() and (row[n - 1] == enc.eos or n == data.GEN_LEN)
            assert not (row[:n - 1] == enc.eos).any()
        assert not (response == enc.mask).any()


def test_a_later_token_never_changes_earlier_logits_and_the_cache_matches_the_full_pass(enc):
    model = causal_model(enc, std=0.3)
    x = data.get_batch(enc, 4, random.Random(0))[1]  # code rows: the widest canvas
    y = x.clone()
    y[:, 60] = (x[:, 60] + 1) % 100
    full, changed = model(x), model(y)
    assert torch.equal(full[:, :60], changed[:, :60]) and not torch.allclose(full[:, 60:], changed[:, 60:])
    # the cached passes, at the positions Transformer.forward gives: the prompt at once, then one token each
    P, kv = x.shape[1] - data.GEN_LEN, KVCache(x.shape[1])
    cached = [model(x[:, :P], cache=kv)]
    cached += [model(x[:, i:i + 1], cache=kv, start=i) for i in range(P, P + 3)]
    assert torch.allclose(torch.cat(cached, dim=1), full[:, :P + 3], atol=1e-5)


def test_ar_loss_counts_only_the_response_targets(enc):
    model = causal_model(enc)
    x0 = data.get_batch(enc, 4, random.Random(0))[0]  # math rows
    P, seen = x0.shape[1] - data.GEN_LEN, []

    def keep_logits(x):
        logits = model(x)
        logits.retain_grad()
        seen.append(logits)
        return logits
    loss = autoregressive.ar_loss(keep_logits, x0, P)
    loss.backward()
    grad = seen[0].grad
    # only the columns that predict a response token (P - 1 .. end - 1) carry gradient
    assert (grad[:, :P - 1] == 0).all() and (grad[:, -1] == 0).all() and (grad[:, P - 1:-1] != 0).any(-1).all()
    ce = torch.nn.functional.cross_entropy(seen[0][:, P - 1:-1].transpose(1, 2), x0[:, P:], reduction="none")
    assert ce.shape == (len(x0), data.GEN_LEN) and torch.allclose(loss, ce.mean())


def test_an_ar_run_saves_an_ar_checkpoint_that_resumes_and_that_no_diffusion_decoder_loads(tmp_path, enc):
    import eval as evaluate
    import sample
    import train_base
    import train_head
    out, base = str(tmp_path / "ar.pt"), str(tmp_path / "base.pt")
    train_base.main(TINY + ["--objective", "ar", "--out", out, "--max-iters", "2", "--eval-every", "2"])
    ckpt = load_checkpoint(out)
    assert kind_of(ckpt) == "ar" and ckpt["model_args"]["causal"] and ckpt["iter"] == 2
    train_base.main(TINY + ["--objective", "ar", "--out", out, "--max-iters", "3", "--eval-every", "3", "--resume"])
    assert load_checkpoint(out)["iter"] == 3
    model, _ = autoregressive.load_ar(out, data.tokenizer_id(enc))
    assert model.config.causal
    with pytest.raises(CheckpointError, match="ar.pt holds an ar checkpoint; this needs a mdlm or a proseco"):
        load_model(out, data.tokenizer_id(enc))
    for main, argv in [(sample.main, ["--ckpt", out, "--no-head", "--num", "1"]),
                       (evaluate.main, ["--base", out, "--num", "1", "--out", str(tmp_path / "eval.json")]),
                       (train_head.main, ["--base", out, "--out", str(tmp_path / "head.pt")])]:
        assert "holds an ar checkpoint" in one_line_error(main, argv + ["--device", "cpu"])
    # and the AR side refuses a diffusion base, in training and in loading
    message = one_line_error(train_base.main, TINY + ["--objective", "ar", "--out", out, "--overwrite",
                                                      "--max-iters", "2", "--elbo-weight"])
    assert "--elbo-weight" in message
    diffusion = Transformer(tiny_config(enc))
    save_checkpoint(base, model=diffusion.state_dict(), model_args=vars(diffusion.config), iter=1,
                    tokenizer_id=data.tokenizer_id(enc), config={"objective": "mdlm"})
    assert "is a mdlm checkpoint, this run trains --objective ar" in one_line_error(
        train_base.main, TINY + ["--objective", "ar", "--out", base, "--resume"])
    with pytest.raises(CheckpointError, match="base.pt holds a mdlm checkpoint; this needs an ar checkpoint"):
        autoregressive.load_ar(base, data.tokenizer_id(enc))
