"""
The comparison: accuracy against mean forward passes per answer (the frontier),
per task and per decoder, on the fixed test set, scored by data.py's verifiers
(math both by its final answer and strictly, every written equation true).

    python eval.py                 # markdown tables on stdout, every point in out/eval.json
    python eval.py --plot          # also out/eval.png: both tasks, one line per decoder and reveal rule
    python eval.py --split val     # the same on validation problems, for choosing settings
    python eval.py --speed         # also time one decoding step: base pass vs head, and the head's share
    python eval.py --runs runs/seed2 runs/seed3 runs/seed4   # several training runs: each, then mean +- std
    python eval.py --decoders base,dsc,ar --steps 8 --thresholds 0.9 --cache none,prefix,dual \
        --latency 20 --throughput 64,256    # the race against the AR twin, with and without a KV cache

Every decoder is run under both reveal rules (sample.py): the fixed schedule at
each of --steps, and the confidence threshold at each of --thresholds. A
decoder is a model and a remasking policy (remasking.py):
    base      the base alone (LLaDA)
    dsc       the DSC head trained with FCA                      (out/head.pt)
    no-fca    the head trained without FCA                       (out/head_nofca.pt)
    random    the control: as many tokens as dsc sent back at each step of each row, at random
    remdm-conf  ReMDM-conf, training-free: the schedule's remasking budget, low-confidence tokens first
    remdm-loop  ReMDM-loop: a fixed budget on its time grid (remasking.LoopSchedule), tokens sent back
                at random once a block is mostly revealed
    proseco-plain   the ProSeCo model decoded like the base      (out/proseco.pt)
    proseco   the ProSeCo model with its corrector loop (proseco.py): corrector
              passes on top of the unmasking steps, as the paper counts them
    proseco-equal   ProSeCo at the same total passes as the others: twice the
              tokens per step, a corrector pass after each (fixed schedule only)
    ar        the autoregressive twin, left to right with a KV cache  (out/ar.pt)
With --cache each diffusion decoder also runs with a KV cache (base+dual, ...;
ProSeCo's loop uncached). Each answer's cost: passes, tokens per pass (TPF), the
FLOPs of the columns each pass fed, ms (--latency: one at a time), answers/s.
Every accuracy comes with a 95% interval over the problems, and the README's
comparisons (DSC against the base, the random control and the no-FCA head, and
every point against the base at one token per step) with a paired one
(report.py). The summary is, per decoder, the fewest mean passes at which it
comes within 2 points of the base's one-token-per-step accuracy. The whole test
split of each task is scored by default. No result is reused: every number comes
from decoding in this run.
"""

import os
import signal

if __name__ == "__main__":  # Ctrl-C or SIGTERM while the imports load (seconds): exit 130, no traceback
    for _signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_signal, lambda *_: (os.write(2, b"interrupted\n"), os._exit(130)))

import argparse
import json
import sys
import time
from contextlib import nullcontext

import torch

import autoregressive
import data
from cli import check_report_path, checkpoint_path, default_head, positive, seed
from common import CheckpointError, interruptible, load_model, model_fingerprint, pick_device
from corrector import step_time
from proseco import ProSeCoCorrector, equal_passes_rule
from report import (comparisons, interval, plot, print_across_runs, print_comparisons, print_speed, print_tables,
                    summary)
from remasking import HeadRemask, LoopSchedule, RandomRemask, ReMDMConf, ReMDMLoop, head_policy, per_row_counts
from sample import BLOCK_LEN, CACHES, ConfidenceThreshold, FixedSchedule, Rollback, check_blocks, decode_problems

DECODERS = ("base", "dsc", "no-fca", "random", "remdm-conf", "remdm-loop", "proseco-plain", "proseco", "proseco-equal",
            "ar")


def run(model, enc, problems, reveal, block_len, batch_size=None, **kwargs):
    """Decode problems, all in one batch by default; returns responses, passes per
    problem, seconds, send-backs by each row's own step (remasking.per_row_counts),
    ProSeCo's corrector passes per problem on average (0 for every other decoder; they
    are part of the passes), and the base's forward FLOPs per problem (None under a
    corrector, whose passes are not the steps: decoded_row counts them)."""
    counts, active, fed, batch_size, corrector = [], [], [], batch_size or len(problems), kwargs.get("corrector")

    def record(before, x, back, working):
        counts.append(back.sum(1))
        active.append(working)
        fed[-1] = (fed[-1], x.shape[1])  # the columns the step's pass fed, of a canvas this wide
    if next(model.parameters()).is_cuda and kwargs.get("compile") is not False:  # compiled before the clock starts
        warm = {**kwargs, "generator": torch.Generator("cuda")} if "generator" in kwargs else kwargs
        decode_problems(model, enc, problems, reveal, batch_size=batch_size, block_len=block_len, **warm)
    hook = model.wte.register_forward_hook(lambda module, inputs, out: fed.append(inputs[0].shape[1]))
    t0 = time.perf_counter()
    try:
        responses, passes = decode_problems(model, enc, problems, reveal, batch_size=batch_size,
                                            block_len=block_len, on_step=record, **kwargs)
    finally:
        hook.remove()
    seconds = time.perf_counter() - t0
    flops = None if corrector else sum(rows.sum().item() * model.pass_flops(cols, width)
                                       for rows, (cols, width) in zip(active, fed)) / len(problems)
    steps = sum(rows.sum().item() for rows in active)  # the predictor's passes: the corrector's are the rest
    return (responses, passes, seconds, per_row_counts(torch.stack(counts), torch.stack(active)),
            (sum(passes) - steps) / len(problems), flops)


def run_ar(model, enc, problems, batch_size=None):
    """The autoregressive twin's answers, as run() returns them (nothing is ever sent back)."""
    t0 = time.perf_counter()
    responses, passes = autoregressive.decode_problems(model, enc, problems, batch_size or len(problems))
    return responses, passes, time.perf_counter() - t0, torch.zeros(1, len(problems)), 0.0, None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=checkpoint_path("base.pt"),
                        help="base checkpoint (default: out/base.pt, else the shipped weights/base.pt)")
    parser.add_argument("--head", default=None, help="DSC head (FCA; default: out/head.pt, else weights/head.pt, "
                                                     "where it was trained on the base in use)")
    parser.add_argument("--head-nofca", default=None,
                        help="ablation head (no FCA; default: out/head_nofca.pt, else weights/, as --head)")
    parser.add_argument("--proseco", default=checkpoint_path("proseco.pt"),
                        help="ProSeCo model (train_base.py --objective proseco; default: out/, else weights/)")
    parser.add_argument("--ar", default=checkpoint_path("ar.pt"),
                        help="autoregressive twin (train_base.py --objective ar; default: out/, else weights/)")
    parser.add_argument("--latency", type=positive(int), default=None, metavar="N",
                        help="also time each decoder answering the first N problems of each task one at a time")
    parser.add_argument("--throughput", default="", metavar="B,B",
                        help="also time each decoder's answers per second in one batch of each size (e.g. 64,256), "
                             "the task's problems repeated to fill it")
    parser.add_argument("--cache", default="none",
                        help="KV caches to run each diffusion decoder with: none and any of "
                             + ", ".join(CACHES) + " (e.g. none,dual)")
    parser.add_argument("--eager", action="store_true",
                        help="no torch.compile on CUDA either (the AR twin is never compiled): the race in one mode")
    parser.add_argument("--decoders", default=",".join(DECODERS),
                        help="the decoders to run (default: all): " + ", ".join(DECODERS))
    parser.add_argument("--runs", nargs="+", default=None, metavar="DIR",
                        help="evaluate several training runs instead (seeds.sh makes them): each DIR holds base.pt "
                             "and any of head.pt, head_nofca.pt, proseco.pt, ar.pt; reports each and the mean +- std")
    parser.add_argument("--remdm-conf-eta", type=positive(float), default=4.0,
                        help="ReMDM-conf: the schedule's remasking budget is scaled by this (the authors' 1; 4 "
                             "picked on validation as the head's tau is)")
    parser.add_argument("--remdm-loop-eta", type=positive(float), default=0.1,
                        help="ReMDM-loop: each token of a mostly revealed block goes back with this probability per "
                             "step (the authors' 0.02; 0.1 picked on validation as the head's tau is)")
    parser.add_argument("--corrector-passes", type=positive(int), default=1,
                        help="ProSeCo: corrector passes S per loop")
    parser.add_argument("--corrector-every", type=positive(int), default=1,
                        help="ProSeCo: a corrector loop every omega steps")
    parser.add_argument("--head-settings", default="",
                        help="override the heads' remasking settings (remasking.HeadRemask), e.g. "
                             "tau=0.9,max_per_position=1,check_every=1")
    parser.add_argument("--split", choices=("test", "val"), default="test", help="problems to score")
    parser.add_argument("--num", type=positive(int), default=None, help="problems per task (default: the whole split)")
    parser.add_argument("--steps", default="32,16,8,4",
                        help="fixed-schedule points: passes per answer, as sample.py's --steps (32 = 1 token/step)")
    parser.add_argument("--thresholds", default="0.5,0.7,0.8,0.9,0.95,0.99", help="confidence-threshold points")
    parser.add_argument("--rollback", default="", help="DSC's rollback schedule at these tokens per step (e.g. 2,4,8)")
    parser.add_argument("--block-len", type=int, default=BLOCK_LEN,
                        help=f"semi-autoregressive block length; {data.GEN_LEN} = one block")
    parser.add_argument("--out", default="out/eval.json", help="where the JSON results go")
    parser.add_argument("--plot", action="store_true", help="write the frontier to the --out path with .png")
    parser.add_argument("--speed", action="store_true", help="time the base pass and the head in a decoding step")
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    args = parser.parse_args(argv)
    try:
        check_blocks(data.GEN_LEN, args.block_len)
        for n in parse_list(args.steps, int):
            if not 0 < n <= data.GEN_LEN or data.GEN_LEN % n:
                raise ValueError(f"--steps: each must divide {data.GEN_LEN} (whole tokens per step), got {n}")
        rules = [("fixed", data.GEN_LEN // n, FixedSchedule(n)) for n in parse_list(args.steps, int)]
        rules += [("threshold", tau, ConfidenceThreshold(tau)) for tau in parse_list(args.thresholds, float)]
        rules += [("rollback", k, Rollback(k)) for k in parse_list(args.rollback, int)]
        for kind, k, rule in rules:
            rule.steps_per_block(data.GEN_LEN, args.block_len)
        overrides = parse_settings(args.head_settings)
        args.throughput = parse_list(args.throughput, int)
        if any(b < 1 for b in args.throughput):
            raise ValueError(f"--throughput: batch sizes must be at least 1, got {args.throughput}")
        args.cache = [None if c == "none" else c for c in parse_choices("--cache", args.cache, ("none", *CACHES))]
        args.decoders = parse_choices("--decoders", args.decoders, DECODERS)
        if "random" in args.decoders and "dsc" not in args.decoders:
            raise ValueError("--decoders: random replays what dsc sent back: name dsc too")
        runs = {d: {"base": os.path.join(d, "base.pt"), "head": os.path.join(d, "head.pt"),
                    "head_nofca": os.path.join(d, "head_nofca.pt"), "proseco": os.path.join(d, "proseco.pt"),
                    "ar": os.path.join(d, "ar.pt")} for d in args.runs} if args.runs else \
            {"": {"base": args.base, "head": args.head, "head_nofca": args.head_nofca, "proseco": args.proseco,
                  "ar": args.ar}}
        check_report_path(args.out, ".json")
        if args.plot:
            check_report_path(os.path.splitext(args.out)[0] + ".png", ".png")
        device = pick_device(args.device)
        enc = data.get_tokenizer()
        loaded = {name: load_run(paths, enc, device, overrides) for name, paths in runs.items()}  # all, before any work
        problems = {task: list(data.fixed_problems(task, args.split, args.num)) for task in data.TASKS}
    except (CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")

    rows, runs_out = [], {}
    for name, models in loaded.items():
        paths = runs[name]
        run_rows = evaluate_run(models, enc, problems, rules, args, device)
        for r in run_rows:
            r["run"] = name
        print_tables(run_rows, args, problems, title=name)
        print_comparisons(comparisons(run_rows))
        timed_rows = args.latency or args.throughput
        print_speed([r for r in run_rows if r["rule"] in ("fixed", "autoregressive") or timed_rows])
        rows += run_rows
        runs_out[name] = {"base": paths["base"], "base_fingerprint": models["fingerprint"],
                          "policies": {n: str(p) for n, p in models["heads"].items()}}
        if args.speed and "dsc" in models["heads"]:
            with models["ctx"]:
                base_ms, head_ms = step_time(models["base"], models["heads"]["dsc"].head, enc, len(problems["code"]))
            print(f"\none decoding step, batch of {len(problems['code'])}: base forward {base_ms:.2f} ms, head "
                  f"{head_ms:.2f} ms: the head adds {head_ms / base_ms:.1%} to a step (median of 30)")
    comps = [{**c, "run": name} for name in runs for c in comparisons([r for r in rows if r["run"] == name])]
    if len(runs) > 1:
        print_across_runs(rows, list(runs), comps)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".tmp", "w") as f:  # renamed when whole: an interrupted write leaves the old report
        json.dump({"rows": rows, "split": args.split, "num_problems": {t: len(p) for t, p in problems.items()},
                   "block_len": args.block_len, "runs": runs_out, "comparisons": comps,
                   "fewest_passes_within_2_points": {name: [[t, d, p] for (t, d), p in summary(
                       [r for r in rows if r["run"] == name]).items()] for name in runs}}, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    if args.plot:
        plot([r for r in rows if r["run"] == next(iter(runs))], os.path.splitext(args.out)[0] + ".png")


def load_run(paths, enc, device, overrides):
    """A run's models: the base, its heads as remasking policies (a head path of None: the
    default, sample.default_head), the ProSeCo model if there is one."""
    base, _ = load_model(paths["base"], data.tokenizer_id(enc))
    fingerprint = model_fingerprint(base)
    heads = {}
    for name, key, made_by in [("dsc", "head", "python train_head.py"),
                               ("no-fca", "head_nofca", "python train_head.py --no-fca")]:
        path = paths[key]
        if path is None:
            policy = default_head(f"{key}.pt", fingerprint, made_by, **overrides)
        elif os.path.exists(path):
            policy = head_policy(path, fingerprint, made_by, **overrides)
        else:
            policy = None
            print(f"note: skipping {name}: {path} does not exist ({made_by} makes it)", file=sys.stderr)
        if policy is not None:
            policy.head.to(device)
            heads[name] = policy
    proseco = None
    if os.path.exists(paths["proseco"]):
        proseco = load_model(paths["proseco"], data.tokenizer_id(enc))[0].to(device)
    else:
        print(f"note: skipping proseco: {paths['proseco']} does not exist "
              "(python train_base.py --objective proseco makes it)", file=sys.stderr)
    ar = (autoregressive.load_ar(paths["ar"], data.tokenizer_id(enc))[0].to(device) if os.path.exists(paths["ar"])
          else None)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()
    return {"base": base.to(device), "fingerprint": fingerprint, "heads": heads, "proseco": proseco, "ar": ar,
            "ctx": ctx}


def evaluate_run(models, enc, problems, rules, args, device):
    """Every decoder under every reveal rule on every task: one row each."""
    torch.manual_seed(args.seed)
    base, heads, proseco = models["base"], models["heads"], models["proseco"]
    rows, dsc_counts = [], None
    for task in data.TASKS:
        for kind, setting, rule in rules:
            seeded = lambda: torch.Generator(device).manual_seed(args.seed)  # noqa: E731
            decoders = [("base", base, {})] + [(name, base, {"policy": policy}) for name, policy in heads.items()]
            if "dsc" in heads:
                decoders.append(("random", base, None))  # replays the dsc run's counts, below
            decoders.append(("remdm-conf", base, {"policy": ReMDMConf(args.remdm_conf_eta), "generator": seeded()}))
            loop = {"policy": ReMDMLoop(args.remdm_loop_eta), "generator": seeded()}
            decoders.append(("remdm-loop", base, {**loop, "reveal": LoopSchedule(rule)} if kind == "fixed"
                             else loop))
            if proseco is not None:
                decoders += [("proseco-plain", proseco, {}),
                             ("proseco", proseco, {"corrector": ProSeCoCorrector(args.corrector_passes,
                                                                                 args.corrector_every)})]
                equal = equal_passes_rule(setting, args.block_len) if kind == "fixed" else None
                if equal is not None:
                    decoders.append(("proseco-equal", proseco, {"corrector": ProSeCoCorrector(1, 1), "reveal": equal}))
            for cache in args.cache:
                for name, model, kwargs in decoders:
                    if cache and "corrector" in (kwargs or {}):
                        continue  # ProSeCo's corrector rewrites every column: it runs uncached only
                    name_here = f"{name}+{cache}" if cache else name
                    if name not in args.decoders:
                        continue
                    if name == "random":
                        kwargs = {"policy": RandomRemask(dsc_counts), "generator": seeded()}
                    kwargs = {"reveal": rule, **kwargs, "cache": cache, **({"compile": False} if args.eager else {})}
                    decode = lambda ps, b=None, model=model, kwargs=kwargs: run(  # noqa: E731
                        model, enc, ps, block_len=args.block_len, batch_size=b, **kwargs)
                    fields = {"rule": kind, ("threshold" if kind == "threshold" else "tokens_per_step"): setting}
                    replays = name == "random"  # it replays the dsc run's batch: timed at that batch only
                    row, counts = decoded_row(task, name_here, model, decode, fields, models["ctx"], enc,
                                              problems[task], None if replays else args.latency,
                                              [] if replays else args.throughput)
                    rows.append(row)
                    if name == "dsc":
                        dsc_counts = counts
        if models["ar"] is not None and "ar" in args.decoders:
            decode = lambda ps, b=None: run_ar(models["ar"], enc, ps, b)  # noqa: E731
            rows.append(decoded_row(task, "ar", models["ar"], decode, {"rule": "autoregressive", "tokens_per_step": 1},
                                    models["ctx"], enc, problems[task], args.latency, args.throughput)[0])
    return rows


def decoded_row(task, name, model, decode, fields, ctx, enc, problems, latency, throughput):
    """Decode (decode(problems, b) answers them in batches of b, by default all in one
    batch), score, and count the cost of an answer: the base's forward
    FLOPs, the tokens per pass, ms one answer at a time over the first `latency`
    problems, answers per second at each `throughput` batch size. Returns (row, the
    tokens sent back at each step of the batch run)."""
    with ctx:
        responses, passes, seconds, counts, corrector_passes, flops = decode(problems)
        ms_batch1 = 1000 * timed(decode, problems[:latency], 1) / latency if latency else None
        per_second = {b: b / timed(decode, (problems * b)[:b], b) for b in throughput}  # repeated to fill the batch
    if flops is None:  # the AR twin's cached passes, or a corrector's, each over the whole canvas
        widths = [len(data.encode_prompt(enc, p.prompt)) for p in problems]
        flops = sum(autoregressive.flops_per_answer(model, w, n) if model.config.causal
                    else n * model.pass_flops(w + data.GEN_LEN, w + data.GEN_LEN)
                    for w, n in zip(widths, passes)) / len(problems)
    tokens = sum(min(data.GEN_LEN, len(enc.encode_ordinary(r)) + 1) for r in responses)  # and its EOS
    row = score_row(task, problems, responses, passes, seconds,
                    {**fields, "decoder": name, "remasked_per_problem": counts.sum().item() / len(problems),
                     "mean_corrector_passes": corrector_passes, "tokens_per_pass": tokens / sum(passes),
                     "gflops_per_answer": flops / 1e9, "ms_per_answer_batch1": ms_batch1,
                     "answers_per_second": per_second})
    print(f"{task} {fields} {name}: {row['accuracy']:.1%} at {row['mean_passes']:.2f} passes", file=sys.stderr)
    return row, counts


def timed(decode, problems, batch_size, repeats=3):
    """Seconds to decode the problems in batches of batch_size: the fastest of `repeats`
    runs after an untimed one (the first run at a new batch size pays one-off costs,
    kernel and buffer set-up; the fastest is the least disturbed by the machine)."""
    decode(problems, batch_size)
    return min(decode(problems, batch_size)[2] for _ in range(repeats))


def score_row(task, problems, responses, passes, seconds, fields):
    """One decoder's results: accuracy with its 95% interval (math both by its final
    answer, GSM8K's metric, and strictly: every written equation true), mean passes,
    and each problem's verdicts, which the paired comparisons need."""
    right = data.score(problems, responses)
    strict = data.score(problems, responses, strict=True) if task == "math" else right
    n = len(problems)
    return {"task": task, **fields, "accuracy": sum(right) / n, "interval": interval(right),
            "strict_accuracy": sum(strict) / n, "strict_interval": interval(strict),
            "mean_passes": sum(passes) / n, "ms_per_problem": 1000 * seconds / n, "right": right,
            "strict_right": strict}


def parse_list(text, kind):
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"expected a comma-separated list of numbers, got {text!r}") from None


def parse_choices(flag, text, known):
    """'a,b' -> ['a', 'b'], each one of `known`, or a one-line ValueError naming the flag."""
    chosen = [c.strip() for c in text.split(",") if c.strip()]
    unknown = sorted(set(chosen) - set(known))
    if unknown or not chosen:
        raise ValueError(f"{flag}: unknown {', '.join(unknown) or 'none given'}; known: {', '.join(known)}")
    return chosen


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
    try:
        HeadRemask(None, **settings)
    except ValueError as e:
        raise ValueError(f"--head-settings: {e}") from None
    return settings


if __name__ == "__main__":
    with interruptible("interrupted: nothing saved"):
        main()
