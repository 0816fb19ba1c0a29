"""
Parallel decoding for the masked diffusion LM, and a CLI to watch it work.

generate() is METHOD.md section 2 (LLaDA's low-confidence remasking): start from
prompt + GEN_LEN masks, make `steps` forward passes, and at each one reveal the
most confident masked positions; tokens per step k = GEN_LEN / steps is the
speed knob. With a correction head (corrector.py), the same forward pass also
scores the tokens revealed so far and the head sends likely-wrong ones back.

    python sample.py --steps 4            # decode test prompts, print verdicts
    python sample.py --steps 4 --show     # watch the canvas fill in, step by step
    python sample.py --prompt "(3+4)*7="  # your own prompt
"""

import argparse
import random
import sys

import torch

import data
from corrector import random_remask, remask
from model import CheckpointError, load_model, most_confident, propose


@torch.no_grad()
def generate(model, prompt_ids, gen_len, steps, block_len=None, temperature=0.0, generator=None,
             head=None, remask_counts=None, extend=False, on_step=None):
    """Decode (B, P) prompt ids into (B, P + gen_len) tokens. Returns (tokens, forward passes).

    Steps are split evenly over semi-autoregressive blocks of block_len (default:
    one block). Each step reveals ceil(masks left / steps left) tokens per row, so
    every mask is filled by the block's last step. With `head` (corrector.py), the
    same forward pass also scores the revealed tokens and remask() sends likely
    wrong ones back; they are predicted again later. By default `steps` is a hard
    budget (later steps reveal more to make room); extend=True is the paper's
    variant: the schedule is kept and corrections add steps (at most 2x).
    remask_counts (steps, B) is the random-remasking control: that many random
    revealed tokens go back at each step. on_step(pass, x, sent_back) sees each step."""
    B, P = prompt_ids.shape
    mask_id = model.config.mask_id
    block_len = block_len or gen_len
    if not 0 < steps <= gen_len:
        raise ValueError(f"--steps must be between 1 and the generation length {gen_len}, got {steps}")
    if block_len <= 0 or gen_len % block_len or steps % (gen_len // block_len):
        raise ValueError(f"the block length ({block_len}) must divide the generation length ({gen_len}) "
                         f"into a number of blocks that divides --steps ({steps})")
    x = torch.cat([prompt_ids, torch.full((B, gen_len), mask_id, device=prompt_ids.device)], dim=1)
    pos = torch.arange(P + gen_len, device=x.device)
    is_response = pos >= P
    stamps = torch.zeros_like(x)  # the remasking FIFO (corrector.remask)
    n_blocks = gen_len // block_len
    steps_per_block, passes = steps // n_blocks, 0
    for blk in range(n_blocks):
        open_ = pos < P + (blk + 1) * block_len  # this block, and earlier positions sent back
        cap = steps_per_block * (2 if extend else 1)
        for s in range(cap):
            if extend and s >= steps_per_block and not ((x == mask_id) & open_).any():
                break  # (the one host sync, and only in the extended variant)
            logits, hidden = model(x, return_hidden=True)
            passes += 1
            x0, confidence = propose(logits, temperature, generator)
            masked = (x == mask_id) & open_
            sent_back = torch.zeros_like(masked)
            if s < cap - 1:  # never send back on a block's last step: nothing could refill it
                revealed = ~masked & is_response & open_
                if head is not None:
                    p_wrong = torch.sigmoid(head(hidden).float())
                    c = head.config
                    sent_back, stamps = remask(p_wrong, revealed, stamps, c.tau, c.max_remask, c.fifo_len)
                elif remask_counts is not None:
                    sent_back = random_remask(revealed, remask_counts[passes - 1], generator)
            n_masked = masked.sum(1)
            steps_left = max(steps_per_block - s, 1)
            owed = n_masked if extend else n_masked + sent_back.sum(1)  # hard budget: make room now
            k = torch.minimum(n_masked, torch.div(owed + steps_left - 1, steps_left, rounding_mode="floor"))
            x = torch.where(most_confident(confidence, masked, k), x0, x)
            x = torch.where(sent_back, mask_id, x)
            if on_step is not None:
                on_step(passes, x, sent_back)
    return x, passes


def decode_problems(model, enc, problems, steps, batch_size=256, **kwargs):
    """Decode each problem's prompt; returns (response texts, forward passes per batch)."""
    device = next(model.parameters()).device
    responses, passes = [], 0
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        prompts = torch.tensor([data.encode_prompt(enc, p.prompt) for p in chunk], device=device)
        out, passes = generate(model, prompts, data.GEN_LEN, steps, **kwargs)
        responses += [data.decode_response(enc, row[data.PROMPT_LEN:].tolist()) for row in out]
    return responses, passes


def show_canvas(enc, step, row, remasked):
    """One line per step: revealed tokens, '_' for masks, [brackets] round tokens sent back."""
    parts = []
    for tok, back in zip(row[data.PROMPT_LEN:].tolist(), remasked[data.PROMPT_LEN:].tolist()):
        text = "_" if tok == enc.mask else "·" if tok == enc.eos else enc.decode([tok])
        parts.append(f"[{text}]" if back else text)
    print(f"step {step:2d} | " + "".join(parts).replace("\n", "⏎"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="out/base.pt", help="base model checkpoint")
    parser.add_argument("--steps", type=int, default=8, help=f"forward passes per response (of {data.GEN_LEN} tokens)")
    parser.add_argument("--block-len", type=int, default=None, help="semi-autoregressive block length (default: one block)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; >0 samples with Gumbel noise")
    parser.add_argument("--task", choices=data.TASKS, default=None, help="only this task (default: both)")
    parser.add_argument("--num", type=int, default=4, help="test prompts per task to decode")
    parser.add_argument("--prompt", default=None, help="decode this prompt instead of test prompts")
    parser.add_argument("--show", action="store_true", help="print the canvas after every step")
    parser.add_argument("--seed", type=int, default=0, help="random seed (matters when temperature > 0)")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    enc = data.get_tokenizer()
    try:
        model, _ = load_model(args.ckpt, data.tokenizer_id(enc))
        if args.prompt is not None:
            prompt = args.prompt.encode().decode("unicode_escape") if "\\n" in args.prompt else args.prompt
            problems = [data.Problem("custom", prompt, [], None)]
            data.encode_prompt(enc, prompt)  # fail early, with the reason, if it does not fit
        else:
            tasks = [args.task] if args.task else list(data.TASKS)
            problems = [p for t in tasks for p in data.fixed_problems(t, "test")[:args.num]]
        generator = torch.Generator().manual_seed(args.seed)
        for p in problems:
            prompts = torch.tensor([data.encode_prompt(enc, p.prompt)])
            if args.show:
                print("-" * 60 + "\n" + p.prompt)
            on_step = (lambda s, x, r: show_canvas(enc, s, x[0], r[0])) if args.show else None
            out, passes = generate(model, prompts, data.GEN_LEN, args.steps, args.block_len, args.temperature,
                                   generator, on_step=on_step)
            p.output = data.decode_response(enc, out[0, data.PROMPT_LEN:].tolist())
    except (CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")

    judged = [p for p in problems if p.task in data.TASKS]
    verdicts = data.score(judged, [p.output for p in judged])
    verdict = dict(zip(map(id, judged), verdicts))
    for p in problems:
        mark = {True: "RIGHT", False: "WRONG"}.get(verdict.get(id(p)), "")
        print("=" * 60 + f"\n{p.prompt.rstrip()}\n--> {mark} ({passes} forward passes)\n{p.output}")
    if judged:
        print("=" * 60 + f"\naccuracy {sum(verdicts)}/{len(judged)} at {data.GEN_LEN / args.steps:.1f} tokens per step")


if __name__ == "__main__":
    main()
