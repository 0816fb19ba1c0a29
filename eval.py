"""
The comparison: accuracy against mean forward passes per answer (the frontier),
per task and per decoder, on the fixed test set, scored by data.py's verifiers
(math both by its final answer and strictly, every written equation true).

    python eval.py                 # markdown tables on stdout, every point in out/eval.json
    python eval.py --plot          # also out/eval.png: both tasks, one line per decoder and reveal rule
    python eval.py --split val     # the same on validation problems, for choosing settings
    python eval.py --speed         # also time one decoding step: base pass vs head, and the head's share

Every decoder is run under both reveal rules (sample.py): the fixed schedule at
--tokens-per-step, and the confidence threshold at each of --thresholds. A
decoder is a model and a remasking policy (remasking.py):
    base      the base alone (LLaDA)
    dsc       the DSC head trained with FCA                      (out/head.pt)
    no-fca    the head trained without FCA                       (out/head_nofca.pt)
    random    the control: as many tokens as dsc sent back at each step, at random
    remdm     ReMDM-conf, training-free
    proseco-plain   the ProSeCo model decoded like the base      (out/proseco.pt)
    proseco   the ProSeCo model with its corrector loop (proseco.py)
The summary is, per decoder, the fewest mean passes at which it comes within 2
points of the base's one-token-per-step accuracy. Nothing is cached: every
number comes from decoding in this run.
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
from common import CheckpointError, load_model, model_fingerprint, pick_device
from proseco import ProSeCoCorrector
from remasking import HeadRemask, RandomRemask, ReMDMConf
from sample import (BLOCK_LEN, ConfidenceThreshold, FixedSchedule, Rollback, check_blocks, checkpoint_path,
                    decode_problems, positive)

NEAR = 0.02  # "within 2 points" of the base at one token per step


def run(model, enc, problems, reveal, block_len, **kwargs):
    """Decode problems in one batch; returns responses, passes per problem, seconds, send-backs (steps, B)."""
    counts = []
    if next(model.parameters()).is_cuda:  # compile the decoding step before the clock starts
        warm = {**kwargs, "generator": torch.Generator("cuda")} if "generator" in kwargs else kwargs
        decode_problems(model, enc, problems, reveal, batch_size=len(problems), block_len=block_len, **warm)
    t0 = time.perf_counter()
    responses, passes = decode_problems(model, enc, problems, reveal, batch_size=len(problems), block_len=block_len,
                                        on_step=lambda before, x, back: counts.append(back.sum(1)), **kwargs)
    return responses, passes, time.perf_counter() - t0, torch.stack(counts)


def summary(rows):
    """Per task and decoder: the fewest mean passes within NEAR of the base at one token per step."""
    out = {}
    for task in dict.fromkeys(r["task"] for r in rows):
        ref = [r for r in rows if r["task"] == task and r["decoder"] == "base" and r["rule"] == "fixed"
               and r["tokens_per_step"] == 1]
        if not ref:
            continue
        bar = ref[0]["accuracy"] - NEAR
        for decoder in dict.fromkeys(r["decoder"] for r in rows):
            near = [r["mean_passes"] for r in rows if r["task"] == task and r["decoder"] == decoder
                    and r["accuracy"] >= bar - 1e-9]
            out[task, decoder] = min(near) if near else None
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=checkpoint_path("base.pt"),
                        help="base checkpoint (default: out/base.pt, else the shipped weights/base.pt)")
    parser.add_argument("--head", default=checkpoint_path("head.pt"), help="DSC head (FCA; default: out/, else weights/)")
    parser.add_argument("--head-nofca", default=checkpoint_path("head_nofca.pt"),
                        help="ablation head (no FCA; default: out/, else weights/)")
    parser.add_argument("--proseco", default="out/proseco.pt", help="ProSeCo model (train_base.py --objective proseco)")
    parser.add_argument("--remdm-eta", type=positive(float), default=0.05,
                        help="ReMDM-conf: tokens sent back per step per revealed token")
    parser.add_argument("--corrector-passes", type=positive(int), default=1, help="ProSeCo: corrector passes S per loop")
    parser.add_argument("--corrector-every", type=positive(int), default=1, help="ProSeCo: a corrector loop every omega steps")
    parser.add_argument("--head-settings", default="",
                        help="override the heads' remasking settings (remasking.HeadRemask), e.g. "
                             "tau=0.9,max_per_position=1,check_every=1")
    parser.add_argument("--split", choices=("test", "val"), default="test", help="problems to score")
    parser.add_argument("--num", type=positive(int), default=150, help="problems per task")
    parser.add_argument("--tokens-per-step", default="1,2,4,8", help="fixed-schedule points")
    parser.add_argument("--thresholds", default="0.5,0.7,0.8,0.9,0.95,0.99", help="confidence-threshold points")
    parser.add_argument("--rollback", default="", help="DSC's rollback schedule at these tokens per step (e.g. 2,4,8)")
    parser.add_argument("--block-len", type=int, default=BLOCK_LEN,
                        help=f"semi-autoregressive block length; {data.GEN_LEN} = one block")
    parser.add_argument("--out", default="out/eval.json", help="where the JSON results go")
    parser.add_argument("--plot", action="store_true", help="write the frontier to the --out path with .png")
    parser.add_argument("--speed", action="store_true", help="time the base pass and the head in a decoding step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    args = parser.parse_args(argv)
    try:
        check_blocks(data.GEN_LEN, args.block_len)
        rules = [("fixed", k, FixedSchedule(data.GEN_LEN // k)) for k in parse_list(args.tokens_per_step, int)]
        rules += [("threshold", tau, ConfidenceThreshold(tau)) for tau in parse_list(args.thresholds, float)]
        rules += [("rollback", k, Rollback(k)) for k in parse_list(args.rollback, int)]
        for kind, k, rule in rules:
            if kind == "fixed" and data.GEN_LEN % k:
                raise ValueError(f"tokens per step must divide {data.GEN_LEN}, got {k}")
            rule.steps_per_block(data.GEN_LEN, args.block_len)
        overrides = parse_settings(args.head_settings)
        if os.path.isdir(args.out) or args.out in (args.base, args.head, args.head_nofca, args.proseco):
            raise ValueError(f"--out {args.out} is a directory or a checkpoint this run reads")
    except ValueError as e:
        sys.exit(f"error: {e}")

    torch.manual_seed(args.seed)
    enc = data.get_tokenizer()
    try:
        device = pick_device(args.device)
        base, _ = load_model(args.base, data.tokenizer_id(enc))
        fingerprint = model_fingerprint(base)
        base.to(device)
        heads = {}
        for name, path in [("dsc", args.head), ("no-fca", args.head_nofca)]:
            if os.path.exists(path):
                head, ckpt = load_head(path, fingerprint)
                heads[name] = HeadRemask(head.to(device), **{**ckpt["remasking"], **overrides})
            else:
                print(f"note: skipping {name}: {path} does not exist (python train_head.py"
                      f"{' --no-fca' if name == 'no-fca' else ''} makes it)", file=sys.stderr)
        proseco = None
        if os.path.exists(args.proseco):
            proseco = load_model(args.proseco, data.tokenizer_id(enc))[0].to(device)
        else:
            print(f"note: skipping proseco: {args.proseco} does not exist "
                  "(python train_base.py --objective proseco makes it)", file=sys.stderr)
    except (CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")
    cuda = device.startswith("cuda")
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()

    rows, dsc_counts = [], None
    for task in data.TASKS:
        problems = list(data.fixed_problems(task, args.split, args.num))
        for kind, setting, rule in rules:
            seeded = lambda: torch.Generator(device).manual_seed(args.seed)  # noqa: E731
            decoders = [("base", base, {})] + [(name, base, {"remask": policy}) for name, policy in heads.items()]
            if "dsc" in heads:
                decoders.append(("random", base, None))  # replays the dsc run's counts, below
            decoders.append(("remdm", base, {"remask": ReMDMConf(args.remdm_eta), "generator": seeded()}))
            if proseco is not None:
                decoders += [("proseco-plain", proseco, {}),
                             ("proseco", proseco, {"corrector": ProSeCoCorrector(args.corrector_passes,
                                                                                 args.corrector_every)})]
            for name, model, kwargs in decoders:
                if name == "random":
                    kwargs = {"remask": RandomRemask(dsc_counts), "generator": seeded()}
                with ctx:
                    responses, passes, seconds, counts = run(model, enc, problems, rule, args.block_len, **kwargs)
                if name == "dsc":
                    dsc_counts = counts
                right = data.score(problems, responses)
                # math both ways: the final answer (GSM8K's metric) and strict (every written equation true)
                strict = data.score(problems, responses, strict=True) if task == "math" else right
                rows.append({"task": task, "rule": kind, **{("threshold" if kind == "threshold" else "tokens_per_step"):
                                                            setting},
                             "decoder": name, "accuracy": sum(right) / len(problems),
                             "strict_accuracy": sum(strict) / len(problems), "strict_right": strict,
                             "mean_passes": sum(passes) / len(problems), "ms_per_problem": 1000 * seconds / len(problems),
                             "remasked_per_problem": counts.sum().item() / len(problems), "right": right})
                print(f"{task} {rule} {name}: {rows[-1]['accuracy']:.1%} at {rows[-1]['mean_passes']:.2f} passes",
                      file=sys.stderr)

    print_tables(rows, args)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    best = summary(rows)
    with open(args.out, "w") as f:
        json.dump({"rows": rows, "split": args.split, "num_problems": args.num, "block_len": args.block_len,
                   "base": args.base, "base_fingerprint": fingerprint,
                   "policies": {name: str(p) for name, p in heads.items()},
                   "fewest_passes_within_2_points": [[t, d, p] for (t, d), p in best.items()]}, f, indent=1)
    if args.plot:
        plot(rows, os.path.splitext(args.out)[0] + ".png")
    if args.speed and "dsc" in heads:
        with ctx:
            base_ms, head_ms = step_time(base, heads["dsc"].head, enc, args.num)
        print(f"\none decoding step, batch of {args.num}: base forward {base_ms:.2f} ms, head {head_ms:.2f} ms: "
              f"the head adds {head_ms / base_ms:.1%} to a step (median of 30)")


def parse_list(text, kind):
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"expected a comma-separated list of numbers, got {text!r}") from None


def parse_settings(text):
    """'tau=0.9,max_per_position=1' -> {'tau': 0.9, 'max_per_position': 1}, checked against HeadRemask."""
    known = HeadRemask(None).settings()
    settings = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in known:
            raise ValueError(f"--head-settings: unknown setting {key!r}; known: {', '.join(known)}")
        try:
            settings[key] = None if value == "None" else float(value) if key == "tau" else int(value)
        except ValueError:
            raise ValueError(f"--head-settings: {key} needs a number, got {value!r}") from None
    return settings


def print_tables(rows, args):
    """One markdown table per task (accuracy @ mean passes), then the summary."""
    decoders = list(dict.fromkeys(r["decoder"] for r in rows))
    for task in data.TASKS:
        both = " (final answer / strict)" if task == "math" else ""
        print(f"\n**{task}** ({args.split}, {args.num} problems): accuracy{both} @ mean forward passes per answer\n")
        print("| reveal rule | " + " | ".join(decoders) + " |")
        print("|---" * (len(decoders) + 1) + "|")
        for key in dict.fromkeys((r["rule"], r.get("tokens_per_step", r.get("threshold"))) for r in rows):
            cells = {r["decoder"]: f"{r['accuracy']:.1%}" + (f" / {r['strict_accuracy']:.1%}" if task == "math" else "")
                     + f" @ {r['mean_passes']:.1f}" for r in rows
                     if r["task"] == task and (r["rule"], r.get("tokens_per_step", r.get("threshold"))) == key}
            label = {"fixed": f"{key[1]} tokens/step", "threshold": f"threshold {key[1]}",
                     "rollback": f"rollback, {key[1]} tokens/step"}[key[0]]
            print(f"| {label} | " + " | ".join(cells.get(d, "") for d in decoders) + " |")
    best = summary(rows)
    print(f"\nfewest mean passes within {NEAR:.0%} of the base at one token per step ('never': no point reaches it)\n")
    print("| decoder | " + " | ".join(data.TASKS) + " |")
    print("|---" * (len(data.TASKS) + 1) + "|")
    for d in decoders:
        print(f"| {d} | " + " | ".join("never" if best.get((t, d)) is None else f"{best[t, d]:.1f}"
                                       for t in data.TASKS) + " |")


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
    """Accuracy against mean passes: a solid line per decoder over the threshold sweep,
    a dashed one over the fixed schedule (dotted: rollback), a grey band 2 points under
    the base's one-token accuracy."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: --plot needs matplotlib (pip install matplotlib); tables and JSON are written", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, len(data.TASKS), figsize=(6 * len(data.TASKS), 4.2))
    decoders = list(dict.fromkeys(r["decoder"] for r in rows))
    colors = dict(zip(decoders, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, task in zip(axes, data.TASKS):
        for d in decoders:
            for kind, style in (("threshold", "-o"), ("fixed", "--s"), ("rollback", ":^")):
                pts = sorted((r["mean_passes"], r["accuracy"]) for r in rows
                             if r["task"] == task and r["decoder"] == d and r["rule"] == kind)
                if pts:
                    ax.plot(*zip(*pts), style, color=colors[d], markersize=4,
                            label=f"{d}" if kind == "threshold" else None, alpha=1 if kind == "threshold" else 0.5)
        ref = [r["accuracy"] for r in rows if r["task"] == task and r["decoder"] == "base" and r["rule"] == "fixed"
               and r["tokens_per_step"] == 1]
        if ref:
            ax.axhspan(ref[0] - NEAR, ref[0], color="grey", alpha=0.2, lw=0)
        ax.set(title=f"{task}: solid = threshold, dashed = fixed tokens/step", xlabel="mean forward passes per answer",
               ylabel="accuracy", xscale="log")
        ax.set_xticks([2, 4, 8, 16, 32], labels=["2", "4", "8", "16", "32"])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
