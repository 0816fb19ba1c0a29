"""
Parallel decoding for the masked diffusion LM, and a CLI to watch it work.

Decoding (METHOD.md sections 2, 3 and 5) starts from prompt + GEN_LEN masks and
fills them in blocks of BLOCK_LEN, left to right. Each step is one forward pass
that answers two questions:
  how many masked tokens to reveal   a reveal rule, here: FixedSchedule (`steps`
                                     passes per answer, LLaDA),
                                     ConfidenceThreshold (every position the
                                     model is sure of, Fast-dLLM) or Rollback
                                     (k per step, send-backs add steps: DSC)
  which revealed tokens to send back a remasking policy, remasking.py: none, the
                                     DSC head, the random control, ReMDM
Any rule goes with any policy. Rows stop costing passes once their answer has
ended (an EOS with no mask before it), so passes are counted per row.

    python sample.py --steps 4            # decode test prompts, print verdicts
    python sample.py --threshold 0.9      # adaptive: as many tokens per step as the model is sure of
    python sample.py --steps 4 --show     # watch the canvas fill in; [x] marks a token the head sent back
    python sample.py --prompt "(3+4)*7="  # your own prompt
    python sample.py --threshold 0.9 --cache dual   # Fast-dLLM's KV cache: fewer columns per pass
"""

import os
import signal

if __name__ == "__main__":  # Ctrl-C or SIGTERM while the imports load (seconds): exit 130, no traceback
    for _signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_signal, lambda *_: (os.write(2, b"interrupted\n"), os._exit(130)))

import argparse
import math
import sys

import torch
import torch.nn.functional as F

import data
from cli import checkpoint_path, default_head, positive, seed
from common import CheckpointError, by_width, interruptible, load_model, model_fingerprint, pick_device
from model import KVCache, most_confident, propose
from remasking import HeadRemask, NoRemask, head_policy

# Two semi-autoregressive blocks of 16 over the 32 response tokens: chosen on validation
# among the lengths that leave the head at least two passes per block at 8 tokens per step.
BLOCK_LEN = 16


class FixedSchedule:
    """LLaDA's schedule: `steps` forward passes per answer, spread evenly over the
    blocks; each reveals ceil(masks owed / steps left in the block), so the block is
    full at its last step. Tokens sent back are owed at once (a hard budget: later
    steps reveal more), so every method compares at the same passes, bar the refill
    step generate adds to a block whose last step sent something back."""

    def __init__(self, steps):
        self.steps = steps

    def steps_per_block(self, gen_len, block_len):
        n_blocks = gen_len // block_len
        if not 0 < self.steps <= gen_len or self.steps % n_blocks:
            raise ValueError(f"--steps must be between 1 and {gen_len} and a multiple of the number of blocks "
                             f"({n_blocks} of {block_len}), got {self.steps}")
        return self.steps // n_blocks

    def reveal(self, confidence, masked, owed, steps_left):
        steps_left = steps_left.clamp(min=1)  # the refill step (0 left) reveals what is owed, like the last
        k = torch.minimum(masked.sum(1), torch.div(owed + steps_left - 1, steps_left, rounding_mode="floor"))
        return most_confident(confidence, masked, k)

    def __str__(self):
        return f"{self.steps} steps"


class ConfidenceThreshold:
    """Fast-dLLM's rule: reveal every masked position of the block whose confidence
    exceeds the threshold, and at least the most confident one, so the number of
    tokens per step adapts. A block gets at most block_len steps; the last of them
    reveals whatever is still masked (only send-backs can make it needed)."""

    def __init__(self, threshold):
        if not 0 < threshold <= 1:
            raise ValueError(f"--threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.bar = torch.tensor(threshold, dtype=torch.float64)  # a tensor: a compiled step serves every threshold

    def steps_per_block(self, gen_len, block_len):
        return block_len

    def reveal(self, confidence, masked, owed, steps_left):
        surest = most_confident(confidence, masked, torch.ones_like(owed))
        return surest | (masked & ((confidence > self.bar) | (steps_left <= 1)))

    def __str__(self):
        return f"threshold {self.threshold}"


class Rollback:
    """DSC's schedule as the paper runs it: k tokens revealed per step, whatever is
    sent back, so every token sent back adds its share of a step (time rolls back).
    A block gets at most twice the steps it needs without send-backs; the last of
    them reveals whatever is still masked."""

    def __init__(self, tokens_per_step):
        self.k = tokens_per_step

    def steps_per_block(self, gen_len, block_len):
        if not 0 < self.k <= block_len or block_len % self.k:
            raise ValueError(f"--rollback tokens per step must divide the block length {block_len}, got {self.k}")
        return 2 * block_len // self.k

    def reveal(self, confidence, masked, owed, steps_left):
        k = torch.where(steps_left <= 1, masked.sum(1), torch.full_like(owed, self.k))
        return most_confident(confidence, masked, k)

    def __str__(self):
        return f"rollback at {self.k} tokens/step"


def check_blocks(gen_len, block_len):
    if not 0 < block_len <= gen_len or gen_len % block_len:
        raise ValueError(f"--block-len must divide the generation length {gen_len}, got {block_len}")


@torch.no_grad()
def generate(model, prompt_ids, reveal, policy=NoRemask(), corrector=None, *, block_len=BLOCK_LEN, eos_id=None,
             temperature=0.0, generator=None):
    """The reference decoder, eager, to be read top to bottom: (B, P) prompt ids ->
    (B, P + GEN_LEN) tokens and the forward passes each row cost (B,). generate_fast is
    the same loop with a KV cache, a compiled step and a per-step hook; the tests hold
    the two to the same tokens and passes for every rule and policy.

    The response starts as masks and is filled in blocks of block_len, left to right.
    A block gets the rule's steps, then one refill step (0 steps left) that only a row
    whose last step sent tokens back still needs: the policy judges the block at its
    last step too. A row costs a pass at a step while its block has masks; with eos_id,
    a row whose answer has ended (EOS revealed, no mask before it) is filled with EOS
    and stops. corrector: ProSeCo's corrector loop (proseco.py), run between a step's
    forward pass and its reveals; its passes are counted too."""
    B, P = prompt_ids.shape
    mask_id, width = model.config.mask_id, P + data.GEN_LEN
    check_blocks(data.GEN_LEN, block_len)
    max_steps = reveal.steps_per_block(data.GEN_LEN, block_len)
    x = torch.cat([prompt_ids, torch.full((B, data.GEN_LEN), mask_id, device=prompt_ids.device)], dim=1)
    pos = torch.arange(width, device=x.device)
    state, passes = policy.start(x), torch.zeros(B, dtype=torch.long, device=x.device)
    for block_start in range(P, width, block_len):  # the blocks, left to right
        block = (pos >= block_start) & (pos < block_start + block_len)
        open_ = (pos >= P) & (pos < block_start + block_len)  # where tokens may change: this block and earlier ones
        for s in range(max_steps + 1):  # the rule's steps, then the refill step
            steps_left = torch.tensor(max_steps - s, device=x.device)
            active = ((x == mask_id) & open_).any(1)  # a row works while its block has masks
            if not active.any():
                break
            passes += active
            # forward: a prediction and its confidence at every column
            logits, hidden = model(x, return_hidden=True)
            if corrector is not None and corrector.due(s, last_step=s == max_steps - 1):
                x, logits, hidden, corrector_passes = corrector(model, x, logits, hidden, open_, active)
                passes += corrector_passes
            x0, confidence = propose(logits, temperature, generator)
            # send back: the policy picks revealed tokens to mask again (never at the refill step)
            masked = (x == mask_id) & open_
            revealed = (x != mask_id) & open_ & active[:, None] & (steps_left > 0)
            sent_back, state = policy.send_back(state, revealed, hidden, block, steps_left, generator)
            # reveal: the rule picks masked tokens to fill in; those just sent back are owed at once
            owed = masked.sum(1) + sent_back.sum(1)
            reveal_now = reveal.reveal(confidence, masked, owed, steps_left)
            state = policy.after_reveal(state, reveal_now, confidence)
            x = torch.where(sent_back, mask_id, torch.where(reveal_now, x0, x))
            if eos_id is not None:
                x = end_answers(x, P, mask_id, eos_id)
    return x, passes


# KV caches for generate_fast (Fast-dLLM's): which columns a step feeds after its
# block's first step, which feeds the whole canvas and refreshes the cache
#   "prefix"  the block and every column after it; the prompt and finished blocks are cached
#   "dual"    the block alone; the masked columns after it are cached too
CACHES = ("prefix", "dual")


@torch.no_grad()
def generate_fast(model, prompt_ids, reveal, policy=NoRemask(), corrector=None, *, block_len=BLOCK_LEN, eos_id=None,
                  temperature=0.0, generator=None, on_step=None, compile=None, cache=None):
    """generate's loop with its step in one function (decode_step) that can be compiled,
    fed through a KV cache, and watched: the same tokens and passes as generate when
    uncached. on_step(before, after, sent_back, active) sees every step.
    compile: None compiles decode_step on CUDA only, False never, a backend name or
    callable compiles with that backend (one graph for every step and call; with a
    cache, one per window fed). ProSeCo's corrector, whose loop stops at data-dependent
    fixed points, runs eager.
    cache: None feeds the whole canvas at every step; one of CACHES feeds it at a block's
    first step only (model.KVCache). With a cache the earlier blocks are final, as a
    block diffusion decoder has them: a policy sends back tokens of the current block
    only (the cached columns would not be predicted again)."""
    B, P = prompt_ids.shape
    gen_len, mask_id, width = data.GEN_LEN, model.config.mask_id, P + data.GEN_LEN
    check_blocks(gen_len, block_len)
    if cache not in (None, *CACHES):
        raise ValueError(f"cache must be None or one of {', '.join(CACHES)}, got {cache!r}")
    if cache and corrector is not None:
        raise ValueError("ProSeCo's corrector reads and rewrites every column: decode it without a cache")
    max_steps = reveal.steps_per_block(gen_len, block_len)
    step_fn = decode_step if corrector is not None else _step_fn(prompt_ids.is_cuda if compile is None else compile)
    x = torch.cat([prompt_ids, torch.full((B, gen_len), mask_id, device=prompt_ids.device)], dim=1)
    pos = torch.arange(width, device=x.device)
    kv = KVCache(width) if cache else None
    steps_left = torch.arange(max_steps, -1, -1, device=x.device)  # then the refill step; made once, no copy per step
    state, passes = policy.start(x), torch.zeros(B, dtype=torch.long, device=x.device)
    for block_end in range(P + block_len, width + 1, block_len):
        block_start = block_end - block_len
        open_ = (pos >= (block_start if cache else P)) & (pos < block_end)  # the block, and earlier ones uncached
        block = (pos >= block_start) & (pos < block_end)
        window = (block_start, block_end if cache == "dual" else width)
        for s in range(max_steps + 1):
            active = ((x == mask_id) & open_).any(1)
            if not active.any():  # the one host sync per step: every row has filled this block
                break
            passes += active
            before = x
            correct = corrector is not None and corrector.due(s, last_step=s == max_steps - 1)
            x, state, sent_back, corrector_passes = step_fn(
                model, x, open_, block, active, steps_left[s], state, reveal, policy, P, eos_id, temperature,
                generator, kv, window if cache and s > 0 else (0, width), corrector if correct else None)
            if correct:
                passes += corrector_passes
            if on_step is not None:
                on_step(before, x, sent_back, active)
    return x, passes


def decode_step(model, x, open_, block, active, steps_left, state, reveal, policy, prompt_len, eos_id=None,
                temperature=0.0, generator=None, cache=None, fed=None, corrector=None):
    """One step of generate over the batch, no host sync: the forward pass (with a
    KVCache, of the columns fed = (lo, hi), the others read from the cache; open_ must
    lie within them), ProSeCo's corrector loop if given, the policy's send-backs and the
    rule's reveals. Returns (x, policy state, sent_back, the corrector's passes per row or None)."""
    if cache is None:
        logits, hidden = model(x, return_hidden=True)
    else:
        lo, hi = fed
        logits, hidden = model(x[:, lo:hi], return_hidden=True, cache=cache, start=lo)
        logits = F.pad(logits, (0, 0, lo, x.shape[1] - hi))  # the columns not fed get no prediction: none is open
        hidden = cache.update_hidden(lo, hidden)  # a head reads every column: those not fed, as last computed
    corrector_passes = None
    if corrector is not None:
        x, logits, hidden, corrector_passes = corrector(model, x, logits, hidden, open_, active)
    mask_id = model.config.mask_id
    x0, confidence = propose(logits, temperature, generator)
    masked = (x == mask_id) & open_
    revealed = (x != mask_id) & open_ & active[:, None] & (steps_left > 0)
    sent_back, state = policy.send_back(state, revealed, hidden, block, steps_left, generator)
    reveal_now = reveal.reveal(confidence, masked, masked.sum(1) + sent_back.sum(1), steps_left)
    state = policy.after_reveal(state, reveal_now, confidence)
    x = torch.where(sent_back, mask_id, torch.where(reveal_now, x0, x))
    if eos_id is not None:
        x = end_answers(x, prompt_len, mask_id, eos_id)
    return x, state, sent_back, corrector_passes


def end_answers(x, prompt_len, mask_id, eos_id):
    """Fill with EOS every row whose answer has ended: from the first response EOS
    with no mask before it to the end (the answer cannot change any more)."""
    response = torch.arange(x.shape[1], device=x.device) >= prompt_len
    masks_so_far = ((x == mask_id) & response).cumsum(1)
    ended = (x == eos_id) & response & (masks_so_far == 0)
    return torch.where(ended.cumsum(1) > 0, eos_id, x)


_compiled_steps = {}


def _step_fn(backend):
    """decode_step, eager (False) or compiled once per backend with static shapes."""
    if backend is False:
        return decode_step
    backend = "inductor" if backend is True else backend
    if backend not in _compiled_steps:
        _compiled_steps[backend] = torch.compile(decode_step, backend=backend, dynamic=False)
    return _compiled_steps[backend]


def decode_problems(model, enc, problems, reveal, batch_size=256, **kwargs):
    """Decode each problem's prompt (blocks, EOS stop); returns (response texts, forward
    passes per problem)."""
    decode = lambda prompts: generate_fast(model, prompts, reveal, eos_id=enc.eos, **kwargs)  # noqa: E731
    return by_width(enc, problems, batch_size, decode, next(model.parameters()).device)


def show_canvas(enc, step, before, after, sent_back):
    """One line per step: how many tokens it revealed, then the canvas: '_' a mask,
    '·' EOS, [x] a token x the step sent back (masked now, predicted again later)."""
    before, after, sent_back = (t[-data.GEN_LEN:].tolist() for t in (before, after, sent_back))
    revealed = sum(b == enc.mask and a != enc.mask for b, a in zip(before, after))
    parts = []
    for old, tok, back in zip(before, after, sent_back):
        text = lambda t: "_" if t == enc.mask else "·" if t == enc.eos else enc.decode([t])  # noqa: E731
        parts.append(f"[{text(old)}]" if back else text(tok))
    print(f"step {step:2d} +{revealed:<2d}| " + "".join(parts).replace("\n", "⏎"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=checkpoint_path("base.pt"),
                        help="base model checkpoint (default: out/base.pt, else the shipped weights/base.pt)")
    parser.add_argument("--head", default=None,
                        help="DSC correction head (default: out/head.pt, else the shipped weights/head.pt, "
                             "where it was trained on the base in use)")
    parser.add_argument("--no-head", action="store_true", help="decode with the base alone")
    rule = parser.add_mutually_exclusive_group()
    rule.add_argument("--steps", type=int, default=None,
                      help=f"fixed schedule: forward passes per response of {data.GEN_LEN} tokens (default 8)")
    rule.add_argument("--threshold", type=positive(float), default=None,
                      help="adaptive: reveal every masked token of the block whose confidence is above this")
    rule.add_argument("--rollback", type=positive(int), default=None,
                      help="DSC's rollback: this many tokens per step; each token sent back adds its share of a step")
    parser.add_argument("--block-len", type=int, default=BLOCK_LEN,
                        help=f"semi-autoregressive block length; {data.GEN_LEN} = one block")
    parser.add_argument("--cache", choices=CACHES, default=None,
                        help="KV cache: a block's later steps feed only its columns and those after it (prefix) or "
                             "its columns alone (dual); approximate, the earlier blocks final (default: none)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; >0 samples with Gumbel noise")
    parser.add_argument("--task", choices=data.TASKS, default=None, help="only this task (default: both)")
    parser.add_argument("--num", type=positive(int), default=4, help="test prompts per task to decode")
    parser.add_argument("--prompt", default=None, help=r"decode this prompt instead (write a newline as \n)")
    parser.add_argument("--show", action="store_true",
                        help="print the canvas after every step; [x] marks a token x the step sent back")
    parser.add_argument("--seed", type=seed, default=0, help="random seed (matters when temperature > 0)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    args = parser.parse_args(argv)
    if not (args.temperature >= 0 and math.isfinite(args.temperature)):
        parser.error(f"--temperature must be 0 or a finite positive number, got {args.temperature}")

    torch.manual_seed(args.seed)
    enc = data.get_tokenizer()
    try:
        reveal = (ConfidenceThreshold(args.threshold) if args.threshold is not None
                  else Rollback(args.rollback) if args.rollback is not None
                  else FixedSchedule(8 if args.steps is None else args.steps))
        check_blocks(data.GEN_LEN, args.block_len)
        reveal.steps_per_block(data.GEN_LEN, args.block_len)
        device = pick_device(args.device)
        model, _ = load_model(args.ckpt, data.tokenizer_id(enc))
        policy = NoRemask()
        if not args.no_head:
            fingerprint = model_fingerprint(model)
            policy = (head_policy(args.head, fingerprint) if args.head
                      else default_head("head.pt", fingerprint, "python train_head.py")) or NoRemask()
        if isinstance(policy, HeadRemask):
            policy.head.to(device)
            print(f"using the correction head: {policy} (--no-head to decode without it)")
        model.to(device)
        if args.prompt is not None:
            problems = [data.Problem("custom", args.prompt.replace("\\n", "\n"), [], None)]
        else:
            tasks = [args.task] if args.task else data.TASKS
            problems = [p for t in tasks for p in data.fixed_problems(t, "test")[:args.num]]
        prompts = [torch.tensor([data.encode_prompt(enc, p.prompt)], device=device) for p in problems]
        generator = torch.Generator(device).manual_seed(args.seed)
        outputs = []
        for i, p in enumerate(problems):
            if args.show:
                print("-" * 60 + "\n" + p.prompt.rstrip())
            steps = []
            on_step = (lambda b, x, back, _: (steps.append(1), show_canvas(enc, len(steps), b[0], x[0], back[0]))) \
                if args.show else None
            out, passes = generate_fast(model, prompts[i], reveal, policy, block_len=args.block_len, eos_id=enc.eos,
                                        temperature=args.temperature, generator=generator, on_step=on_step,
                                        cache=args.cache)
            outputs.append((data.decode_response(enc, out[0, -data.GEN_LEN:].tolist()), passes.item()))
    except (CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")

    judged = [i for i, p in enumerate(problems) if p.task in data.TASKS]
    scored = [problems[i] for i in judged], [outputs[i][0] for i in judged]
    verdicts = dict(zip(judged, data.score(*scored)))
    strict = dict(zip(judged, data.score(*scored, strict=True)))  # math: every written equation true too
    for i, (p, (response, passes)) in enumerate(zip(problems, outputs)):
        mark = {True: "RIGHT", False: "WRONG"}.get(verdicts.get(i), "")
        if verdicts.get(i) and not strict[i]:
            mark += " by its final answer, WRONG by its worked steps"
        print("=" * 60 + f"\n{p.prompt.rstrip()}\n--> {mark} ({passes} forward passes)\n{response}")
    if judged:
        right = sum(verdicts.values())
        mean_passes = sum(o[1] for o in outputs) / len(outputs)
        print("=" * 60 + f"\naccuracy {right}/{len(judged)} (strict {sum(strict.values())}) with {reveal} and "
              f"remasking {policy}: {mean_passes:.1f} forward passes per answer")


if __name__ == "__main__":
    with interruptible("interrupted"):
        main()
