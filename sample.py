"""
Parallel decoding for the masked diffusion LM, and a CLI to watch it work.

generate() is METHOD.md section 2 (LLaDA's low-confidence remasking): start from
prompt + GEN_LEN masks, make `steps` forward passes, and at each one reveal the
most confident masked positions of the current block (the CLI, eval.py and the
training scripts decode in two blocks of BLOCK_LEN, left to right); tokens per
step k = GEN_LEN / steps is the speed knob. With a correction head
(corrector.py), the same forward pass also scores the tokens revealed so far and
the head sends likely-wrong ones back.

    python sample.py --steps 4            # decode test prompts, print verdicts
    python sample.py --steps 4 --show     # watch the canvas fill in, step by step
    python sample.py --prompt "(3+4)*7="  # your own prompt
    python sample.py --block-len 32       # one block: the whole answer at once
"""

import argparse
import os
import sys

import torch

import data
from corrector import load_head, random_remask, remask
from model import CheckpointError, load_model, model_fingerprint, most_confident, pick_device, propose

# The default decoding: two semi-autoregressive blocks of 16 over the 32 response tokens.
# Picked on validation at one token per step among the lengths that leave the head two
# or more steps per block at 8 tokens per step (README, "Decoding in blocks").
BLOCK_LEN = 16


@torch.no_grad()
def generate(model, prompt_ids, gen_len, steps, block_len=None, temperature=0.0, generator=None,
             head=None, remask_counts=None, remdm_eta=0.0, extend=False, corrector_steps=0, corrector_every=1,
             on_step=None, review=None, compile=None):
    """Decode (B, P) prompt ids into (B, P + gen_len) tokens. Returns (tokens, forward passes).

    Steps are split evenly over semi-autoregressive blocks of block_len (default:
    one block). Each step reveals ceil(masks left / steps left) tokens per row, so
    every mask is filled by the block's last step. With `head` (corrector.py), the
    same forward pass also scores the revealed tokens and remask() sends likely
    wrong ones back (once per head.config.check_every tokens revealed); they are
    predicted again later. By default `steps` is a hard budget (later steps
    reveal more to make room); extend=True is the paper's variant: the
    schedule is kept and corrections add steps (at most 2x).
    remask_counts (steps, B) is the random-remasking control: that many random
    revealed tokens go back at each step. remdm_eta > 0 is ReMDM-conf, training-free:
    each step about eta * (tokens revealed) go back, drawn with probability
    softmax(-confidence they were revealed with). corrector_steps=S > 0 is ProSeCo's sampler:
    every corrector_every unmasking steps, correct() refines the revealed tokens
    with up to S more forward passes, and the next step reveals from its last
    logits. on_step(pass, x, sent_back) sees each unmasking step. review=R keeps a
    block's last R passes for corrections (default: the head's own setting, else 0):
    every new token is revealed before them, so the last ones revealed can still be
    judged (R=1) and refilled (R=2); a token revealed in the final pass never can. compile: None
    compiles decode_step with torch.compile on CUDA only; False never; a backend
    name or callable compiles with that backend."""
    B, P = prompt_ids.shape
    mask_id = model.config.mask_id
    block_len = block_len or gen_len
    check_schedule(gen_len, steps, block_len)
    step_fn = _step_fn(prompt_ids.is_cuda if compile is None else compile)
    if review is None:
        review = head.config.review if head is not None else 0
    x = torch.cat([prompt_ids, torch.full((B, gen_len), mask_id, device=prompt_ids.device)], dim=1)
    pos = torch.arange(P + gen_len, device=x.device)
    is_response = pos >= P
    stamps = torch.zeros_like(x)  # the remasking FIFO (corrector.remask)
    revealed_with = torch.zeros(x.shape, dtype=torch.float64, device=x.device)  # ReMDM-conf: confidence at reveal
    n_blocks = gen_len // block_len
    steps_per_block, passes, reuse, step_no = steps // n_blocks, 0, None, -1
    # the head checks once per head.config.check_every tokens revealed: every step at that many
    # tokens per step or more, every few steps below, where checking every step cost accuracy
    # at one token per step (README, "How often the head checks")
    check_every = 1 if head is None else max(1, head.config.check_every * steps_per_block // block_len)
    for blk in range(n_blocks):
        open_ = pos < P + (blk + 1) * block_len  # this block, and earlier positions sent back
        cap = steps_per_block * (2 if extend else 1)
        # the block's per-step numbers, made once as tensors: no host-to-device copy inside the loop,
        # and a compiled step sees the same shapes every time
        passes_left = torch.tensor([max(steps_per_block - review - s, 1) for s in range(cap)], device=x.device)
        step = torch.arange(cap, device=x.device)
        may_send_back = (step < cap - 1) & (step % check_every == check_every - 1)  # never on a block's last step
        for s in range(cap):
            if extend and s >= steps_per_block and not ((x == mask_id) & open_).any():
                break  # (the one host sync, and only in the extended variant)
            step_no += 1
            passes += reuse is None
            random_count = None if remask_counts is None else remask_counts[step_no]
            x, stamps, revealed_with, sent_back, logits = step_fn(
                model, x, open_, is_response, passes_left[s], may_send_back[s], stamps, revealed_with, temperature,
                generator, head, random_count, remdm_eta, extend, reuse)
            reuse = None
            if on_step is not None:
                on_step(passes, x, sent_back)
            if corrector_steps and (s + 1) % corrector_every == 0 and s < cap - 1:
                x, reuse, n = correct(model, x, logits, is_response, corrector_steps)
                passes += n
    return x, passes


def check_schedule(gen_len, steps, block_len):
    """Refuse a budget or block length the decoder cannot spread evenly (ValueError)."""
    if not 0 < steps <= gen_len:
        raise ValueError(f"--steps must be between 1 and the generation length {gen_len}, got {steps}")
    if block_len <= 0 or gen_len % block_len or steps % (gen_len // block_len):
        raise ValueError(f"the block length ({block_len}) must divide the generation length ({gen_len}) "
                         f"into a number of blocks that divides --steps ({steps}); --block-len {gen_len} is one block")


def decode_step(model, x, open_, is_response, passes_left, may_send_back, stamps, revealed_with, temperature=0.0,
                generator=None, head=None, random_count=None, remdm_eta=0.0, extend=False, reuse=None):
    """One decoding step, vectorised over the batch with no host sync: one forward
    pass (or ProSeCo's `reuse`d one), the head's (or a control's) send-backs among the
    revealed tokens, then the most confident masked positions revealed.
    Returns (x, stamps, revealed_with, sent_back, logits)."""
    mask_id = model.config.mask_id
    logits, hidden = model(x, return_hidden=True) if reuse is None else reuse
    x0, confidence = propose(logits, temperature, generator)
    masked = (x == mask_id) & open_
    revealed = ~masked & is_response & open_ & may_send_back
    sent_back = torch.zeros_like(masked)
    if head is not None:
        p_wrong = torch.sigmoid(head(hidden).float())
        c = head.config
        sent_back, stamps = remask(p_wrong, revealed, stamps, c.tau, c.max_remask, c.fifo_len)
    elif random_count is not None:
        sent_back = random_remask(revealed, random_count, generator)
    elif remdm_eta > 0:
        sent_back = remdm_conf(revealed, revealed_with, remdm_eta, generator)
    n_masked = masked.sum(1)
    owed = n_masked if extend else n_masked + sent_back.sum(1)  # hard budget: make room now
    k = torch.minimum(n_masked, torch.div(owed + passes_left - 1, passes_left, rounding_mode="floor"))
    reveal = most_confident(confidence, masked, k)
    x = torch.where(reveal, x0, x)
    revealed_with = torch.where(reveal, confidence, revealed_with)
    x = torch.where(sent_back, mask_id, x)
    return x, stamps, revealed_with, sent_back, logits


_compiled_steps = {}


def _step_fn(backend):
    """decode_step, eager (False) or compiled once per backend with static shapes."""
    if backend is False:
        return decode_step
    backend = "inductor" if backend is True else backend
    if backend not in _compiled_steps:
        _compiled_steps[backend] = torch.compile(decode_step, backend=backend, dynamic=False)
    return _compiled_steps[backend]


def remdm_conf(revealed, revealed_with, eta, generator=None):
    """ReMDM-conf (METHOD.md 5): each revealed token goes back with probability
    eta * n_revealed * softmax(-its confidence at reveal), so about eta * n_revealed
    tokens per step, the least confident most often."""
    weight = torch.where(revealed, -revealed_with, float("-inf")).softmax(dim=1).nan_to_num(0.0)
    p = (eta * revealed.sum(1, keepdim=True) * weight).clamp(max=1.0)
    return (torch.rand(p.shape, dtype=p.dtype, device=p.device, generator=generator) < p) & revealed


def correct(model, x, logits, is_response, max_steps):
    """ProSeCo's corrector loop (METHOD.md 4): fill every response position with the
    argmax, then y <- argmax model(y) up to max_steps times, stopping at a fixed point.
    Only positions already revealed in x take the result. Returns (x, the last
    forward pass's (logits, hidden), forward passes made)."""
    y = torch.where(is_response, logits.argmax(-1), x)
    for n in range(1, max_steps + 1):
        out = model(y, return_hidden=True)
        y_next = torch.where(is_response, out[0].argmax(-1), y)
        if torch.equal(y_next, y):  # a fixed point: more passes would change nothing
            break
        y = y_next
    revealed = (x != model.config.mask_id) & is_response
    return torch.where(revealed, y_next, x), out, n


def decode_problems(model, enc, problems, steps, batch_size=256, block_len=BLOCK_LEN, **kwargs):
    """Decode each problem's prompt in blocks of block_len; returns (response texts, forward
    passes per batch). Prompts are batched with others of their width, the layout the model
    was trained on."""
    device = next(model.parameters()).device
    responses, passes = [None] * len(problems), 0
    encoded, by_width = [data.encode_prompt(enc, p.prompt) for p in problems], {}
    for i, ids in enumerate(encoded):
        by_width.setdefault(len(ids), []).append(i)
    for rows in by_width.values():
        for j in range(0, len(rows), batch_size):
            chunk = rows[j:j + batch_size]
            prompts = torch.tensor([encoded[i] for i in chunk], device=device)
            out, passes = generate(model, prompts, data.GEN_LEN, steps, block_len, **kwargs)
            for i, row in zip(chunk, out):
                responses[i] = data.decode_response(enc, row[-data.GEN_LEN:].tolist())
    return responses, passes


def show_canvas(enc, step, row, remasked):
    """One line per step: revealed tokens, '_' for masks, [brackets] round tokens sent back."""
    parts = []
    for tok, back in zip(row[-data.GEN_LEN:].tolist(), remasked[-data.GEN_LEN:].tolist()):
        text = "_" if tok == enc.mask else "·" if tok == enc.eos else enc.decode([tok])
        parts.append(f"[{text}]" if back else text)
    print(f"step {step:2d} | " + "".join(parts).replace("\n", "⏎"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="out/base.pt", help="base model checkpoint")
    parser.add_argument("--head", default="out/head.pt", help="DSC correction head, used when the file exists")
    parser.add_argument("--no-head", action="store_true", help="decode with the base alone")
    parser.add_argument("--extend", action="store_true", help="the paper's variant: corrections add forward passes")
    parser.add_argument("--steps", type=int, default=8, help=f"forward passes per response of {data.GEN_LEN} tokens")
    parser.add_argument("--block-len", type=int, default=BLOCK_LEN,
                        help=f"semi-autoregressive block length; {data.GEN_LEN} = one block")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; >0 samples with Gumbel noise")
    parser.add_argument("--task", choices=data.TASKS, default=None, help="only this task (default: both)")
    parser.add_argument("--num", type=int, default=4, help="test prompts per task to decode")
    parser.add_argument("--prompt", default=None, help=r"decode this prompt instead (write a newline as \n)")
    parser.add_argument("--show", action="store_true", help="print the canvas after every step; [x] marks tokens sent back")
    parser.add_argument("--seed", type=int, default=0, help="random seed (matters when temperature > 0)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    enc = data.get_tokenizer()
    try:
        model, _ = load_model(args.ckpt, data.tokenizer_id(enc))
        head = None
        if not args.no_head and os.path.exists(args.head):
            head, _ = load_head(args.head, model_fingerprint(model))
            head.to(device)
            print(f"using the correction head {args.head} (tau={head.config.tau}, {head.config.review} review passes; "
                  "--no-head to decode without it)")
        model.to(device)
        if args.prompt is not None:
            problems = [data.Problem("custom", args.prompt.replace("\\n", "\n"), [], None)]
        else:
            problems = [p for t in ([args.task] if args.task else data.TASKS) for p in data.fixed_problems(t, "test")[:args.num]]
        prompts = [torch.tensor([data.encode_prompt(enc, p.prompt)], device=device) for p in problems]
        generator = torch.Generator(device).manual_seed(args.seed)
        outputs = []
        for i, p in enumerate(problems):
            if args.show:
                print("-" * 60 + "\n" + p.prompt.rstrip())
            on_step = (lambda s, x, back: show_canvas(enc, s, x[0], back[0])) if args.show else None
            out, passes = generate(model, prompts[i], data.GEN_LEN, args.steps, args.block_len, args.temperature,
                                   generator, head=head, extend=args.extend, on_step=on_step)
            outputs.append((data.decode_response(enc, out[0, -data.GEN_LEN:].tolist()), passes))
    except (CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")

    judged = [i for i, p in enumerate(problems) if p.task in data.TASKS]
    verdicts = dict(zip(judged, data.score([problems[i] for i in judged], [outputs[i][0] for i in judged])))
    for i, (p, (response, passes)) in enumerate(zip(problems, outputs)):
        mark = {True: "RIGHT", False: "WRONG"}.get(verdicts.get(i), "")
        print("=" * 60 + f"\n{p.prompt.rstrip()}\n--> {mark} ({passes} forward passes)\n{response}")
    if judged:
        right = sum(verdicts.values())
        print("=" * 60 + f"\naccuracy {right}/{len(judged)} at {data.GEN_LEN / args.steps:.1f} tokens per step"
              f"{' with the head' if head is not None else ''}")


if __name__ == "__main__":
    main()
