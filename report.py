"""
How eval.py's results are read: 95% intervals (a bootstrap over problems, paired
where two decoders answered the same problems), the comparisons the README
makes, the frontier summary, the tables, the mean and spread across training
runs, and the plot.

The intervals cover the problems drawn, not the training run: the checkpoints
are held fixed. What a different seed would do is what several runs
(eval.py --runs) show, as mean +- standard deviation across them.

    python report.py runs/seed11/eval.json runs/seed12/eval.json   # across runs, from saved reports
"""

import argparse
import json
import sys

import torch

import data

NEAR = 0.02  # "within 2 points" of the base at one token per step


RESAMPLES = 2000  # the bounds' own resampling noise is then well under a point


def interval(right, baseline=None, resamples=RESAMPLES, seed=0):
    """95% interval of the accuracy of 0/1 outcomes `right`, or, with `baseline` (the
    other decoder's outcomes on the same problems), of the paired difference."""
    x = torch.tensor(right, dtype=torch.float64)
    if baseline is not None:
        x = x - torch.tensor(baseline, dtype=torch.float64)
    resampled = x[torch.randint(len(x), (resamples, len(x)), generator=torch.Generator().manual_seed(seed))]
    lo, hi = torch.quantile(resampled.mean(1), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return [lo, hi]


# the claims the README makes: (a, b) -> a's accuracy minus b's, on the same problems and reveal setting
CLAIMS = [("dsc", "base"), ("dsc", "random"), ("dsc", "no-fca"), ("random", "base"), ("dsc", "remdm-conf"),
          ("dsc", "remdm-loop"), ("remdm-conf", "base"), ("remdm-loop", "base"),
          ("proseco", "proseco-plain"), ("proseco-plain", "base"), ("proseco-equal", "base"), ("dsc", "proseco-equal")]


def comparisons(rows):
    """Paired differences with 95% intervals: each CLAIMS pair at each reveal setting,
    each decoder with a KV cache (base+dual, ...) against itself without one,
    and every decoder at every setting against the base at one token per step (the
    quality a faster decoder has to keep) and against the autoregressive twin (the
    quality a reader expects). Math: final answer and strict."""
    by = {(r["task"], setting(r), r["decoder"]): r for r in rows}
    pairs = [((t, s, a), (t, s, b)) for (t, s, d) in by for a, b in CLAIMS if d == a and (t, s, b) in by]
    pairs += [((t, s, d), (t, s, d.split("+")[0])) for (t, s, d) in by if "+" in d and (t, s, d.split("+")[0]) in by]
    for ref in (("fixed", 1), "base"), (("autoregressive", 1), "ar"):  # the quality to keep, the quality to reach
        pairs += [((t, s, d), (t, *ref)) for (t, s, d) in by if (t, *ref) in by and (s, d) != ref]
    out = []
    for a, b in dict.fromkeys(pairs):  # a CLAIMS pair against the base at one token per step comes twice
        a, b = by[a], by[b]
        for metric in ("right", "strict_right") if a["task"] == "math" else ("right",):
            diff = (sum(a[metric]) - sum(b[metric])) / len(a[metric])
            out.append({"task": a["task"], "metric": "strict" if metric == "strict_right" else "final",
                        "a": (a["decoder"], *setting(a)), "b": (b["decoder"], *setting(b)),
                        "difference": diff, "interval": interval(a[metric], b[metric])})
    return out


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


def setting(row):
    """A row's reveal setting: ('fixed', tokens per step), ('threshold', t) or ('rollback', k)."""
    return row["rule"], row.get("tokens_per_step", row.get("threshold"))


def label(rule, value):
    return {"fixed": f"{value} tokens/step", "threshold": f"threshold {value}",
            "rollback": f"rollback, {value} tokens/step", "autoregressive": "left to right, KV cache"}[rule]


def pct(x, lo_hi=None):
    return f"{100 * x:.1f}" + (f" ({100 * lo_hi[0]:.1f}-{100 * lo_hi[1]:.1f})" if lo_hi else "")


def passes(row):
    """Mean passes per answer; ProSeCo's as predictor + corrector = total."""
    c = row.get("mean_corrector_passes", 0)
    return f"{row['mean_passes'] - c:.1f} + {c:.1f} = {row['mean_passes']:.1f}" if c else f"{row['mean_passes']:.1f}"


def print_tables(rows, args, problems, title=""):
    """One markdown table per task (accuracy with its 95% interval @ mean passes), then the summary."""
    decoders = list(dict.fromkeys(r["decoder"] for r in rows))
    for task in data.TASKS:
        both = " (final answer / strict)" if task == "math" else ""
        print(f"\n**{task}**{' ' + title if title else ''} ({args.split}, {len(problems[task])} problems): "
              f"accuracy % (95% interval){both} @ mean forward passes per answer\n")
        print("| reveal rule | " + " | ".join(decoders) + " |")
        print("|---" * (len(decoders) + 1) + "|")
        for key in dict.fromkeys(setting(r) for r in rows):
            cells = {r["decoder"]: pct(r["accuracy"], r["interval"])
                     + (f" / {pct(r['strict_accuracy'], r['strict_interval'])}" if task == "math" else "")
                     + f" @ {passes(r)}" for r in rows if r["task"] == task and setting(r) == key}
            print(f"| {label(*key)} | " + " | ".join(cells.get(d, "") for d in decoders) + " |")
    best = summary(rows)
    print(f"\nfewest mean passes within {NEAR:.0%} of the base at one token per step ('never': no point reaches it)\n")
    print("| decoder | " + " | ".join(data.TASKS) + " |")
    print("|---" * (len(data.TASKS) + 1) + "|")
    for d in decoders:
        print(f"| {d} | " + " | ".join("never" if best.get((t, d)) is None else f"{best[t, d]:.1f}"
                                       for t in data.TASKS) + " |")


def print_speed(rows):
    """What each answer costs: mean passes, tokens per pass (TPF), the base's forward
    GFLOPs, ms in one batch of the split and, if measured, one answer at a time and
    answers per second at larger batches."""
    sizes = sorted({int(b) for r in rows for b in r.get("answers_per_second", {})})
    at_batches = ", answers per second at batch " + " and ".join(map(str, sizes)) if sizes else ""
    print(f"\ncost per answer: mean passes, tokens per pass, GFLOPs, ms in one batch of the split, ms one at a time"
          f"{at_batches}\n")
    print("| task | reveal rule | decoder | accuracy | passes | TPF | GFLOPs | ms (batch) | ms (batch 1) |"
          + "".join(f" answers/s (batch {b}) |" for b in sizes))
    print("|---" * (9 + len(sizes)) + "|")
    for r in rows:
        one, per_second = r.get("ms_per_answer_batch1"), {int(b): v for b, v in r.get("answers_per_second", {}).items()}
        tpf = r.get("tokens_per_pass")
        print(f"| {r['task']} | {label(*setting(r))} | {r['decoder']} | {pct(r['accuracy'])} | {passes(r)} "
              f"| {'' if tpf is None else f'{tpf:.2f}'} | {r['gflops_per_answer']:.2f} | {r['ms_per_problem']:.2f} "
              f"| {'' if one is None else f'{one:.1f}'} |"
              + "".join(f" {per_second[b]:.0f} |" if b in per_second else " |" for b in sizes))


def claim_name(c):
    a, b = c["a"], c["b"]
    return f"{a[0]} {label(*a[1:])} - {b[0]} {label(*b[1:])}"


def print_comparisons(comps, at=("fixed", 4)):
    """The paired comparisons at one reveal setting (the README's), in points."""
    shown = [c for c in comps if tuple(c["a"][1:]) == at]
    if not shown:
        return
    print(f"\npaired differences in points (95% bootstrap interval over the same problems), {label(*at)}\n")
    print("| task | metric | comparison | difference |\n|---|---|---|---|")
    for c in shown:
        print(f"| {c['task']} | {c['metric']} | {claim_name(c)} | {100 * c['difference']:+.1f} "
              f"({100 * c['interval'][0]:+.1f} to {100 * c['interval'][1]:+.1f}) |")


def print_across_runs(rows, runs, comps):
    """Mean +- standard deviation across training runs of every accuracy and of every
    paired comparison, each run's own figure beside it; a comparison 'holds on every
    run' when each run's interval is above zero."""
    print(f"\n**across {len(runs)} runs** ({', '.join(runs)}): mean +- std (each run's figure)\n")
    print("| task | reveal rule | decoder | accuracy | strict (math) | mean passes |\n|---|---|---|---|---|---|")
    keys = dict.fromkeys((r["task"], setting(r), r["decoder"]) for r in rows)
    for task, key, decoder in keys:
        group = [r for r in rows if (r["task"], setting(r), r["decoder"]) == (task, key, decoder)]
        cell = lambda f: spread([r[f] for r in group])  # noqa: E731
        passes = sum(r["mean_passes"] for r in group) / len(group)
        print(f"| {task} | {label(*key)} | {decoder} | {cell('accuracy')} | "
              f"{cell('strict_accuracy') if task == 'math' else ''} | {passes:.1f} |")
    print("\n| task | metric | comparison | mean +- std (each run) | holds on every run |\n|---|---|---|---|---|")
    for name in dict.fromkeys((c["task"], c["metric"], claim_name(c)) for c in comps):
        group = [c for c in comps if (c["task"], c["metric"], claim_name(c)) == name]
        if len(group) == len(runs) and group[0]["a"][1:] == ("fixed", 4):
            holds = all(c["interval"][0] > 0 for c in group) or all(c["interval"][1] < 0 for c in group)
            print(f"| {name[0]} | {name[1]} | {name[2]} | {spread([c['difference'] for c in group], sign=True)} | "
                  f"{'yes' if holds else 'no'} |")


def spread(values, sign=False):
    """'mean +- std (v1, v2, ...)' in points; std with n-1 (the runs are a sample of seeds)."""
    v = torch.tensor(values, dtype=torch.float64) * 100
    fmt = "{:+.1f}" if sign else "{:.1f}"
    std = v.std().item() if len(v) > 1 else 0.0
    return f"{fmt.format(v.mean().item())} +- {std:.1f} ({', '.join(fmt.format(x) for x in v.tolist())})"


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


def main(argv=None):
    """The across-runs tables from eval.py reports saved apart (seeds.sh writes one per
    seed, so a seed evaluated in another session counts): nothing is decoded again."""
    parser = argparse.ArgumentParser(description="mean +- std across the runs in saved eval.py reports")
    parser.add_argument("reports", nargs="+", metavar="JSON", help="eval.py --out files, one or more runs each")
    args = parser.parse_args(argv)
    rows, comps, runs, splits = [], [], [], set()
    for path in args.reports:
        try:
            with open(path) as f:
                saved = json.load(f)
            names, splits = list(saved["runs"]), splits | {saved["split"]}
            rows += saved["rows"]
            comps += [{**c, "a": tuple(c["a"]), "b": tuple(c["b"])} for c in saved["comparisons"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            sys.exit(f"error: {path}: not an eval.py report ({type(e).__name__}: {e})")
        if set(names) & set(runs):
            sys.exit(f"error: {path}: run {sorted(set(names) & set(runs))[0]} is already in an earlier report")
        runs += names
    if len(splits) > 1:
        sys.exit(f"error: the reports score different splits ({', '.join(sorted(splits))})")
    print_across_runs(rows, runs, comps)


if __name__ == "__main__":
    main()
