"""
The comparison: accuracy against tokens per step, per task and per method, at
equal forward passes, on the fixed test set, scored by data.py's verifiers.

    python eval.py                 # markdown table on stdout, JSON in out/eval.json
    python eval.py --plot          # also out/eval.png (needs matplotlib)
    python eval.py --speed         # also time one decoding step: base pass vs head, and the head's share

Methods (each needs its checkpoint; a missing head is skipped with a note):
    base      the base alone (LLaDA low-confidence decoding, in blocks of --block-len)
    dsc       base + the DSC head trained with FCA        (out/head.pt)
    no-fca    base + the head trained without FCA         (out/head_nofca.pt)
    random    base + random remasking of as many tokens as the DSC head sent back, step by step
              (with the DSC head's review passes: the same schedule, chance instead of the head)
    remdm     base + ReMDM-conf remasking, training-free
    proseco-plain   the ProSeCo model decoded like the base               (out/proseco.pt)
    proseco   the ProSeCo model with its corrector loop between unmasking steps
Nothing is cached: every number comes from decoding in this run.
"""

import argparse
import json
import os
import sys
import time
from contextlib import nullcontext

import torch

import data
from corrector import load_head
from model import CheckpointError, load_model, model_fingerprint, pick_device
from sample import BLOCK_LEN, check_schedule, decode_problems

TOKENS_PER_STEP = (1, 2, 4, 8)


def run(model, enc, problems, steps, **kwargs):
    """Decode problems in one batch; returns responses, passes, seconds, per-step send-back counts."""
    counts = []
    if next(model.parameters()).is_cuda:  # compile the decoding step before the clock starts
        decode_problems(model, enc, problems, steps, batch_size=len(problems), **{**kwargs, "generator": None})
    t0 = time.perf_counter()
    responses, passes = decode_problems(model, enc, problems, steps, batch_size=len(problems),
                                        on_step=lambda s, x, back: counts.append(back.sum(1)), **kwargs)
    return responses, passes, time.perf_counter() - t0, torch.stack(counts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="out/base.pt", help="base checkpoint")
    parser.add_argument("--head", default="out/head.pt", help="DSC head (FCA)")
    parser.add_argument("--head-nofca", default="out/head_nofca.pt", help="ablation head (no FCA)")
    parser.add_argument("--proseco", default="out/proseco.pt", help="ProSeCo model (train_base.py --objective proseco)")
    parser.add_argument("--remdm-eta", type=float, default=0.05, help="ReMDM-conf: tokens sent back per step per revealed token")
    parser.add_argument("--corrector-steps", type=int, default=1, help="ProSeCo: corrector passes S per loop")
    parser.add_argument("--corrector-every", type=int, default=1, help="ProSeCo: a corrector loop every omega steps")
    parser.add_argument("--num", type=int, default=150, help="test problems per task")
    parser.add_argument("--tokens-per-step", default="1,2,4,8", help="budgets to evaluate")
    parser.add_argument("--block-len", type=int, default=BLOCK_LEN,
                        help=f"semi-autoregressive block length; {data.GEN_LEN} = one block")
    parser.add_argument("--out", default="out/eval.json", help="where the JSON results go")
    parser.add_argument("--plot", action="store_true", help="write accuracy vs tokens per step to out/eval.png")
    parser.add_argument("--speed", action="store_true", help="time the base pass and the head in a decoding step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    args = parser.parse_args(argv)
    try:
        budgets = [int(k) for k in args.tokens_per_step.split(",")]
        for k in budgets:
            if not 0 < k <= data.GEN_LEN:
                raise ValueError(f"tokens per step must be between 1 and {data.GEN_LEN}, got {k}")
            check_schedule(data.GEN_LEN, data.GEN_LEN // k, args.block_len)
    except ValueError as e:
        sys.exit(f"error: --tokens-per-step {args.tokens_per_step} with --block-len {args.block_len}: {e}")

    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    cuda = device.startswith("cuda")
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    enc = data.get_tokenizer()
    try:
        base, _ = load_model(args.base, data.tokenizer_id(enc))
        fingerprint = model_fingerprint(base)
        base.to(device)
        heads = {}
        for name, path in [("dsc", args.head), ("no-fca", args.head_nofca)]:
            if os.path.exists(path):
                heads[name] = load_head(path, fingerprint)[0].to(device)
            else:
                print(f"note: skipping {name}: {path} does not exist (python train_head.py"
                      f"{' --no-fca' if name == 'no-fca' else ''} makes it)", file=sys.stderr)
        proseco = None
        if os.path.exists(args.proseco):
            proseco = load_model(args.proseco, data.tokenizer_id(enc))[0].to(device)
        else:
            print(f"note: skipping proseco: {args.proseco} does not exist "
                  "(python train_base.py --objective proseco makes it)", file=sys.stderr)
    except CheckpointError as e:
        sys.exit(f"error: {e}")

    rows = []
    for task in data.TASKS:
        problems = list(data.fixed_problems(task, "test", args.num))
        for k in budgets:
            steps = data.GEN_LEN // k
            dsc_counts, seeded = None, lambda: torch.Generator(device).manual_seed(args.seed)
            methods = [("base", base, {})] + [(name, base, {"head": h}) for name, h in heads.items()]
            if "dsc" in heads:
                methods.append(("random", base, None))  # replays the DSC run's per-step counts
            methods.append(("remdm", base, {"remdm_eta": args.remdm_eta, "generator": seeded()}))
            if proseco is not None:
                methods += [("proseco-plain", proseco, {}),
                            ("proseco", proseco, {"corrector_steps": args.corrector_steps,
                                                  "corrector_every": args.corrector_every})]
            for name, model, kwargs in methods:
                if name == "random":
                    kwargs = {"remask_counts": dsc_counts, "generator": seeded(), "review": heads["dsc"].config.review}
                with ctx:
                    responses, passes, seconds, counts = run(model, enc, problems, steps,
                                                             block_len=args.block_len, **kwargs)
                if name == "dsc":
                    dsc_counts = counts
                accuracy = sum(data.score(problems, responses)) / len(problems)
                rows.append({"task": task, "tokens_per_step": k, "method": name, "accuracy": accuracy,
                             "forward_passes": passes, "ms_per_problem": 1000 * seconds / len(problems),
                             "tokens_per_s": len(problems) * data.GEN_LEN / seconds,
                             "remasked_per_problem": counts.sum().item() / len(problems)})
                print(f"{task} k={k} {name}: {accuracy:.1%}", file=sys.stderr)

    print("| task | tokens/step | method | accuracy | forward passes | ms/problem | tokens/s | remasked/problem |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['tokens_per_step']} | {r['method']} | {r['accuracy']:.1%} | {r['forward_passes']} | "
              f"{r['ms_per_problem']:.2f} | {r['tokens_per_s']:.0f} | {r['remasked_per_problem']:.2f} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"rows": rows, "num_problems": args.num, "block_len": args.block_len, "base": args.base,
                   "base_fingerprint": fingerprint}, f, indent=1)
    if args.plot:
        plot(rows, os.path.splitext(args.out)[0] + ".png")
    if args.speed and "dsc" in heads:
        with ctx:
            base_ms, head_ms = step_time(base, heads["dsc"], enc, args.num)
        print(f"\none decoding step, batch of {args.num}: base forward {base_ms:.2f} ms, head {head_ms:.2f} ms: "
              f"the head adds {head_ms / base_ms:.1%} to a step (median of 30)")


@torch.no_grad()
def step_time(base, head, enc, batch_size, repeats=30):
    """Median milliseconds of the base forward pass and of the head on its hidden states."""
    device = next(base.parameters()).device
    prompts = data.encode_prompts(enc, [p.prompt for p in data.fixed_problems("code", "test", batch_size)])
    x = torch.cat([prompts, torch.full((batch_size, data.GEN_LEN), enc.mask)], dim=1).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None  # GPU work is asynchronous
    base_t, head_t = [], []
    for _ in range(repeats + 3):
        sync()
        t0 = time.perf_counter()
        _, hidden = base(x, return_hidden=True)
        sync()
        t1 = time.perf_counter()
        torch.sigmoid(head(hidden).float())
        sync()
        t2 = time.perf_counter()
        base_t.append(t1 - t0)
        head_t.append(t2 - t1)
    median = lambda v: sorted(v[3:])[len(v[3:]) // 2] * 1000  # noqa: E731 (first 3 are warm-up)
    return median(base_t), median(head_t)


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: --plot needs matplotlib (pip install matplotlib); table and JSON are written", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, len(data.TASKS), figsize=(5 * len(data.TASKS), 3.5))
    for ax, task in zip(axes, data.TASKS):
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = [(r["tokens_per_step"], r["accuracy"]) for r in rows if r["task"] == task and r["method"] == method]
            ax.plot(*zip(*pts), marker="o", label=method)
        ax.set(title=task, xlabel="tokens per step", ylabel="accuracy", xscale="log", xticks=TOKENS_PER_STEP)
        ax.set_xticklabels(TOKENS_PER_STEP)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
