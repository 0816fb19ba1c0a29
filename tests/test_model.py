import random

import torch

import data
from model import Transformer, mask_response, masked_diffusion_loss
from conftest import tiny_config


def test_attention_is_bidirectional(tiny_model):
    x = torch.randint(0, 100, (1, data.PROMPT_LEN + data.GEN_LEN))
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % 100  # change only the last token
    assert not torch.allclose(tiny_model(x)[0, 0], tiny_model(y)[0, 0])  # the first position sees it


def test_a_narrow_canvas_keeps_the_response_positions(tiny_model, enc):
    seen = []
    hook = tiny_model.wpe.register_forward_hook(lambda module, inputs, out: seen.append(inputs[0]))
    for x0 in data.get_batch(enc, 8, random.Random(0)):  # math rows on 48 columns, code rows on 80
        tiny_model(x0)
    hook.remove()
    for x0, pos in zip(data.get_batch(enc, 8, random.Random(0)), seen):
        assert pos.tolist() == list(range(tiny_model.config.block_size - x0.shape[1], tiny_model.config.block_size))


def test_prompt_is_never_masked(enc):
    x0 = data.get_batch(enc, 16, random.Random(0))[0]
    P = x0.shape[1] - data.GEN_LEN
    xt, masked = mask_response(x0, P, torch.ones(len(x0)), enc.mask)
    assert (xt[:, :P] == x0[:, :P]).all()
    assert (xt[:, P:] == enc.mask).all()  # t=1: every response token masked


def test_mask_token_is_never_predicted(tiny_model):
    logits = tiny_model(torch.randint(0, 100, (2, data.PROMPT_LEN + data.GEN_LEN)))
    assert torch.isneginf(logits[..., tiny_model.config.mask_id]).all()


def test_loss_counts_only_masked_response_positions(tiny_model, enc):
    x0 = data.get_batch(enc, 4, random.Random(0))[1]  # 1 code row, the widest canvas
    torch.manual_seed(0)
    loss, logits, t, masked = masked_diffusion_loss(tiny_model, x0, data.PROMPT_LEN, enc.mask)
    assert not masked[:, :data.PROMPT_LEN].any() and masked.any()
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x0, reduction="none")
    assert torch.allclose(loss, ce[masked].mean())
    torch.manual_seed(0)
    elbo, _, t, masked = masked_diffusion_loss(tiny_model, x0, data.PROMPT_LEN, enc.mask, elbo_weight=True)
    assert torch.allclose(elbo, (ce * masked / t[:, None]).sum() / (len(x0) * data.GEN_LEN))


def test_tiny_model_overfits_a_handful_of_examples(enc):
    from sample import FixedSchedule, generate
    torch.manual_seed(0)
    rng = random.Random(0)
    problems = [data.sample_problem("math", "train", rng) for _ in range(4)]
    prompts = data.encode_prompts(enc, [p.prompt for p in problems])
    x0 = torch.cat([prompts, torch.tensor([data.encode_response(enc, p.responses[0]) for p in problems])], dim=1)
    model = Transformer(tiny_config(enc, n_embd=64))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(600):
        loss = masked_diffusion_loss(model, x0, prompts.shape[1], enc.mask)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    out, _ = generate(model.eval(), prompts, FixedSchedule(data.GEN_LEN))
    assert (out == x0).all()


def test_compiled_training_step_compiles_once_per_canvas_width(enc):
    import torch._dynamo
    graphs = []

    def counting_backend(gm, example_inputs):  # one call per traced graph
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Transformer(tiny_config(enc))
    compiled = torch.compile(model, backend=counting_backend, dynamic=False)  # as train_base.py does on CUDA
    rng = random.Random(0)
    for _ in range(3):  # fresh batches, masks and t every step: each task's shape stays the same
        for x0 in data.get_batch(enc, 8, rng):
            masked_diffusion_loss(compiled, x0, x0.shape[1] - data.GEN_LEN, enc.mask)[0].backward()
    assert len(graphs) == len(data.PROMPT_WIDTHS)
