"""
The paths a GPU run takes, run on this CPU: the training step and the decoding
step compiled by the real inductor backend (on a CPU it writes C++ kernels where
CUDA gets Triton, after the same graph capture, autograd and lowering), bf16
autocast, and the CUDA default model. -s shows the figures each test measures.

    python -m pytest -q tests/test_compile.py -s

Inductor keeps what it compiled in /tmp/torchinductor_$USER, so a second run
is much faster than the first on a machine.
"""

import random
from dataclasses import asdict

import pytest
import torch
import torch._dynamo
from torch._inductor.compile_fx import compile_fx

import data
import train_base
from conftest import tiny_config
from corrector import CorrectionHead, HeadConfig
from common import load_model, save_checkpoint
from model import Transformer, TransformerConfig, masked_diffusion_loss
from remasking import HeadRemask, NoRemask
from sample import FixedSchedule, generate, generate_fast

# Compiled and eager float32 differ only in the order of sums (inductor fuses and
# reorders reductions): far below these, far above a real miscompilation.
LOGIT_TOL, LOSS_TOL, GRAD_TOL = 1e-4, 1e-5, 1e-5

CUDA_PRESET = train_base.DEFAULTS["cuda"]


@pytest.fixture(scope="module", autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # no compiled frames left by other files: every count here starts at zero
    yield
    torch._dynamo.reset()


def counting_inductor(graphs):
    """The real inductor backend, keeping each graph torch.compile hands it: one per compilation."""
    def backend(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)
    return backend


def max_difference(a, b):
    """Largest |a - b| over the finite entries; the -inf entries (the mask logit) must agree."""
    assert torch.equal(torch.isneginf(a), torch.isneginf(b))
    finite = torch.isfinite(a)
    return (a[finite] - b[finite]).abs().max().item()


def code_prompts(enc, n=3):
    return data.encode_prompts(enc, [p.prompt for p in data.fixed_problems("code", "test", n)])


# -----------------------------------------------------------------------------
# the training step: train_base compiles the model on CUDA and calls it through batch_loss


def training_step(model, run, batches, enc, seed):
    """train_base's loss and backward on `batches` through `run` (the model or its compiled
    twin): (loss, logits per task, gradients). The seed fixes t and the masks."""
    logits = []

    def loss_fn(*a):
        loss, task_logits, _, _ = masked_diffusion_loss(*a)
        logits.append(task_logits.detach())
        return loss

    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    loss = train_base.batch_loss(loss_fn, run, batches, enc.mask, False)
    loss.backward()
    return loss.detach(), logits, {name: p.grad.clone() for name, p in model.named_parameters()}


def test_inductor_training_step_matches_eager_and_compiles_once_per_canvas_width(enc):
    torch.manual_seed(0)
    model = Transformer(tiny_config(enc))
    graphs = []
    compiled = torch.compile(model, backend=counting_inductor(graphs), dynamic=False)  # as train_base.py on CUDA
    rng = random.Random(0)
    batches = data.get_batch(enc, 8, rng)  # math rows on 48 columns, code rows on 80
    eager_loss, eager_logits, eager_grads = training_step(model, model, batches, enc, seed=1)
    loss, logits, grads = training_step(model, compiled, batches, enc, seed=1)
    warm = len(graphs)

    logit_diff = max(max_difference(c, e) for c, e in zip(logits, eager_logits))
    grad_diff = max((grads[k] - eager_grads[k]).abs().max().item() for k in grads)
    assert logit_diff < LOGIT_TOL and abs(loss - eager_loss).item() < LOSS_TOL and grad_diff < GRAD_TOL

    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for seed in (2, 3):  # new batches, masks and weights: the same graphs serve every step
        later_loss, _, _ = training_step(model, compiled, data.get_batch(enc, 8, rng), enc, seed)
        optimizer.step()
        assert torch.isfinite(later_loss)
    assert warm == len(data.PROMPT_WIDTHS) and len(graphs) == warm
    print(f"\ninductor training step: {warm} graphs (one per canvas width), {len(graphs) - warm} recompiles "
          f"in 2 more steps; max |compiled - eager|: logits {logit_diff:.1e}, loss "
          f"{abs(loss - eager_loss).item():.1e}, gradients {grad_diff:.1e}")


# -----------------------------------------------------------------------------
# the decoding step: generate compiles decode_step on CUDA


class LogitsOut(torch.nn.Module):
    """The model, also writing each pass's logits into a buffer, so that the logits
    computed inside the compiled step can be read after it."""

    def __init__(self, model, shape):
        super().__init__()
        self.model, self.config = model, model.config
        self.register_buffer("logits", torch.zeros(shape))

    def forward(self, x, return_hidden=False):
        logits, hidden = self.model(x, return_hidden=True)
        self.logits.copy_(logits)
        return (logits, hidden) if return_hidden else logits


def decode(model, prompts, steps, remask, enc, compile):
    """generate's tokens, passes and per step (canvas, sent back, logits)."""
    trace = []
    out, passes = generate_fast(model, prompts, FixedSchedule(steps), policy=remask, eos_id=enc.eos, compile=compile,
                                on_step=lambda before, x, back, active: trace.append((x, back, model.logits.clone())))
    return out, passes, trace


@pytest.mark.parametrize("with_head", [False, True], ids=["base", "head"])
def test_inductor_decoding_step_gives_the_eager_tokens_and_compiles_once(enc, with_head):
    torch.manual_seed(0)
    base = Transformer(tiny_config(enc)).eval()
    head = CorrectionHead(HeadConfig(n_embd_in=base.config.n_embd, width=16)).eval()
    remask = HeadRemask(head, tau=0.0) if with_head else NoRemask()  # tau 0: the head sends back at every check
    prompts = code_prompts(enc)
    model = LogitsOut(base, (len(prompts), prompts.shape[1] + data.GEN_LEN, base.config.vocab_size))
    graphs = []
    backend = counting_inductor(graphs)

    eager = decode(model, prompts, 8, remask, enc, compile=False)
    compiled = decode(model, prompts, 8, remask, enc, compile=backend)
    warm = len(graphs)
    again = decode(model, prompts, 8, remask, enc, compile=backend)
    other_budget = decode(model, prompts, 4, remask, enc, compile=backend)

    for run in (compiled, again):  # greedy: the same tokens, passes and send-backs at every step
        assert torch.equal(run[0], eager[0]) and torch.equal(run[1], eager[1])
        assert all(torch.equal(c[0], e[0]) and torch.equal(c[1], e[1]) for c, e in zip(run[2], eager[2]))
    assert torch.equal(other_budget[0], decode(model, prompts, 4, remask, enc, compile=False)[0])
    assert not (compiled[0] == enc.mask).any()
    sent_back = sum(back.sum().item() for _, back, _ in compiled[2])
    assert sent_back > 0 if with_head else sent_back == 0
    logit_diff = max(max_difference(c[2], e[2]) for c, e in zip(compiled[2], eager[2]))
    assert logit_diff < LOGIT_TOL
    assert warm == 1 and len(graphs) == 1  # a second call and another budget reuse the graph
    print(f"\ninductor decoding step ({remask}): {warm} graph, {len(graphs) - warm} recompiles over a second "
          f"call and a 4-step budget; tokens equal eager over {len(compiled[2])} steps ({sent_back} sent back); "
          f"max |compiled - eager| logit {logit_diff:.1e}")


# -----------------------------------------------------------------------------
# bf16 autocast: what train_base.py, train_head.py and eval.py wrap their work in on CUDA


def test_bf16_autocast_trains_decodes_without_the_mask_and_saves_float32(enc, tmp_path):
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)  # the CUDA runs' ctx, on this device
    torch.manual_seed(0)
    config = tiny_config(enc)
    model = Transformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    rng = random.Random(0)
    for _ in range(3):
        with bf16:
            batches = data.get_batch(enc, 8, rng)
            loss = train_base.batch_loss(train_base.loss_of("mdlm"), model, batches, enc.mask, False)
        assert torch.isfinite(loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    model.eval()
    prompts = code_prompts(enc)
    with bf16:
        logits = model(torch.cat([prompts, torch.full((len(prompts), data.GEN_LEN), enc.mask)], dim=1))
        head = CorrectionHead(HeadConfig(n_embd_in=config.n_embd, width=16)).eval()
        for remask in (NoRemask(), HeadRemask(head, tau=0.0)):
            out, _ = generate(model, prompts, FixedSchedule(8), policy=remask, eos_id=enc.eos)
            assert not (out == enc.mask).any()
    assert torch.isneginf(logits[..., enc.mask]).all()

    path = str(tmp_path / "base.pt")
    save_checkpoint(path, model=model.state_dict(), optimizer=optimizer.state_dict(), model_args=asdict(config),
                    tokenizer_id=data.tokenizer_id(enc), iter=3, best_val=0.0, config={})
    saved = torch.load(path, weights_only=True)
    tensors = list(saved["model"].values()) + [v for s in saved["optimizer"]["state"].values() for v in s.values()
                                                if v.dim() > 0]
    assert {t.dtype for t in tensors} == {torch.float32}
    reloaded, _ = load_model(path, data.tokenizer_id(enc))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in reloaded.state_dict().items())


# -----------------------------------------------------------------------------
# the CUDA default model, at a batch this CPU can hold


def saved_bytes(run):
    """Bytes of the distinct storages autograd saves for backward while `run()` runs, and its result."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = run()
    return sum(storages.values()), result


def test_cuda_default_model_trains_a_step_and_decodes_here(enc):
    config = TransformerConfig(vocab_size=enc.n_vocab, block_size=data.PROMPT_LEN + data.GEN_LEN,
                               n_layer=CUDA_PRESET["n_layer"], n_head=CUDA_PRESET["n_head"],
                               n_embd=CUDA_PRESET["n_embd"])
    torch.manual_seed(0)
    model = Transformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=True)  # as on CUDA; PyTorch has a fused CPU kernel too
    bf16, loss_fn = torch.autocast("cpu", dtype=torch.bfloat16), train_base.loss_of("mdlm")

    def bf16_loss(batches):
        with bf16:
            return train_base.batch_loss(loss_fn, model, batches, enc.mask, False)

    # 5 rows (3 math, 2 code) keep the default batch's 3:2 split of tasks; 10 rows, its double
    small, double = (data.get_batch(enc, n, random.Random(0)) for n in (5, 10))
    small_bytes, loss = saved_bytes(lambda: bf16_loss(small))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in model.parameters())
    double_bytes, _ = saved_bytes(lambda: bf16_loss(double))

    model.eval()
    prompts = code_prompts(enc, 2)
    with bf16:
        out, passes = generate(model, prompts, FixedSchedule(2), eos_id=enc.eos)  # a pass a block: bf16 is slow on CPU
    assert not (out == enc.mask).any() and (passes <= 2).all()

    # Memory at the default batch, estimated: 16 bytes a parameter (fp32 weights,
    # gradients, AdamW's two moments) plus the activations autograd keeps for backward
    # under bf16 autocast. Those are measured here, eager, as the growth from 5 to 10
    # rows (the weights' bf16 copies cancel out), scaled by tokens to the default
    # batch. Compiled, inductor keeps less (it recomputes cheap elementwise ops); the
    # CUDA context, allocator slack and the gradients in flight come on top.
    tokens = lambda batches: sum(x.numel() for x in batches)  # noqa: E731
    per_token = (double_bytes - small_bytes) / (tokens(double) - tokens(small))
    default_tokens = tokens(data.get_batch(enc, CUDA_PRESET["batch_size"], random.Random(0)))
    n_params = sum(p.numel() for p in model.parameters())
    state_gb, activation_gb = 16 * n_params / 1e9, per_token * default_tokens / 1e9
    assert state_gb + activation_gb < 24  # fits a 24 GB card (L4, 4090): the smallest model.peak_flops knows
    print(f"\nCUDA default model ({', '.join(f'{k} {v}' for k, v in CUDA_PRESET.items())}): "
          f"{model.num_params() / 1e6:.2f}M parameters ({n_params / 1e6:.2f}M with position embeddings); "
          f"one bf16 step at 5 rows: loss {loss.item():.3f}; decoded 2 prompts in {passes.max().item()} passes. "
          f"At batch {CUDA_PRESET['batch_size']} ({default_tokens} tokens): weights + gradients + AdamW "
          f"{state_gb:.2f} GB, activations {per_token / 1e3:.1f} kB/token = {activation_gb:.1f} GB, "
          f"about {state_gb + activation_gb:.1f} GB in all")
