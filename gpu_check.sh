#!/usr/bin/env bash
# The GPU check: the README's commands with the CUDA defaults, on one CUDA device,
# in under ten minutes, and the figures the README's CUDA section needs.
#
#     bash gpu_check.sh                  # everything lands in $OUT (default: out/gpu)
#     OUT=/tmp/gpu CKPT=/tmp/ckpt BUDGET_S=900 bash gpu_check.sh
#
# Three stages, each logged with TORCH_LOGS=recompiles,graph_breaks,dynamo:
#   python train_base.py     the CUDA defaults (8 layers, width 512, batch 512), --max-iters BASE_ITERS
#   python train_head.py     --max-iters HEAD_ITERS, one tau (to fit the budget)
#   python eval.py --speed   --num 150 on three reveal rules
#   python eval.py           the race: the shipped base (with and without its head and
#                            each KV cache) against the shipped AR twin, the same size,
#                            ms per answer at batch 1, answers/s at batch 64 and 256,
#                            both eager (the AR decoder is not compiled)
# Checkpoints go to $CKPT (default $OUT), never over out/base.pt or out/head.pt.
# Each stage stops at its share of BUDGET_S seconds (SIGTERM: train_base.py saves
# and exits), so the script ends in time whatever happens. $OUT/summary.md holds
# training tokens/s and MFU, decoding ms per problem with and without the head,
# graphs compiled, recompiles, graph breaks and peak GPU memory; the logs beside
# it hold the rest.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-$ROOT/out/gpu}
BASE_ITERS=${BASE_ITERS:-300}
HEAD_ITERS=${HEAD_ITERS:-100}
BUDGET_S=${BUDGET_S:-570}
PYTHON=${PYTHON:-python}
CKPT=${CKPT:-$OUT}
mkdir -p "$OUT" "$CKPT" && OUT=$(cd "$OUT" && pwd) && CKPT=$(cd "$CKPT" && pwd)
cd "$ROOT"

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "error: no CUDA device (torch.cuda.is_available() is False, or torch is missing): this check measures" \
         "the GPU path and has nothing to measure here; run the CPU suite with python -m pytest -q tests" >&2
    exit 1
fi

START=$(date +%s)
rm -f "$CKPT/base.pt" "$CKPT/head.pt" "$OUT/eval.json"  # every figure comes from this run
: > "$OUT/stages.txt"
{ "$PYTHON" -c 'import torch; print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null; } > "$OUT/device.txt"
MEMORY_LOG=""
if command -v nvidia-smi > /dev/null; then  # GPU memory in use, sampled twice a second, for the peak
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/gpu_memory_mib.txt" 2>/dev/null &
    MEMORY_LOG=$!
fi

# stage NAME CAP_S COMMAND...: run COMMAND into $OUT/NAME.log, stopped at CAP_S or the budget's end
stage() {
    local name=$1 cap=$2 left t0 rc
    shift 2
    left=$(( BUDGET_S - ($(date +%s) - START) ))
    (( left < cap )) && cap=$left
    if (( cap < 30 )); then
        echo "$name: skipped, the time budget is spent" | tee -a "$OUT/stages.txt"
        return 1
    fi
    t0=$(date +%s)
    TORCH_LOGS=recompiles,graph_breaks,dynamo timeout -k 15 "$cap" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "$name: exit $rc after $(( $(date +%s) - t0 )) s (limit $cap s): $*" | tee -a "$OUT/stages.txt"
    return $rc
}

stage train_base 200 "$PYTHON" train_base.py --out "$CKPT/base.pt" --overwrite --max-iters "$BASE_ITERS" --eval-every "$BASE_ITERS"
if [ -f "$CKPT/base.pt" ]; then  # a run stopped by its limit has saved one too
    stage train_head 150 "$PYTHON" train_head.py --base "$CKPT/base.pt" --out "$CKPT/head.pt" --overwrite \
        --max-iters "$HEAD_ITERS" --taus 0.9
    stage eval 120 "$PYTHON" eval.py --speed --num 150 --steps 32,8 --thresholds 0.9 \
        --base "$CKPT/base.pt" --head "$CKPT/head.pt" --head-nofca "$CKPT/none.pt" --proseco "$CKPT/none.pt" \
        --out "$OUT/eval.json"
fi
stage race "$BUDGET_S" "$PYTHON" eval.py --eager --decoders base,dsc,ar --steps 8 --thresholds 0.9 \
    --cache none,prefix,dual --latency 20 --throughput 64,256 --out "$OUT/race.json"
[ -n "$MEMORY_LOG" ] && kill "$MEMORY_LOG" 2>/dev/null
echo "all stages: $(( $(date +%s) - START )) s" >> "$OUT/stages.txt"

"$PYTHON" - "$OUT" > "$OUT/summary.md" <<'EOF'
import json, os, re, statistics, sys

import data

out = sys.argv[1]


def read(name):
    path = os.path.join(out, name)
    return open(path, errors="replace").read() if os.path.exists(path) else ""


def steady(log):
    """Median tokens/s and MFU over the second half of the steps tqdm logged (the first step compiles)."""
    pairs = [(int(t.group(1)), int(m.group(1))) for chunk in re.split(r"[\r\n]", log)
             if (t := re.search(r"tok_s=(\d+)", chunk)) and (m := re.search(r"mfu=(\d+)%", chunk))]
    half = pairs[len(pairs) // 2:]
    if not half:
        return "no step logged"
    return (f"{statistics.median(p[0] for p in half):,.0f} tokens/s, MFU {statistics.median(p[1] for p in half)}% "
            f"(median of the last {len(half)} steps)")


def compiles(log):
    """Graphs compiled, recompiles by function, recompile-limit hits and graph breaks, from TORCH_LOGS."""
    recompiled = re.findall(r"Recompiling function (\S+)", log)
    limits = sorted(set(re.findall(r"hit config\.recompile_limit.*\n.*function: '([^']+)'", log)))
    breaks = re.findall(r"Graph Break Reason: ([^\n]*)", log)
    first_failures = re.findall(r"triggered by the following guard failure\(s\):\n.*?- \d+/\d+: ([^\n]*)", log)
    reasons = sorted({re.sub(r"\d+", "N", r.split("#")[0].strip())[:100] for r in first_failures})  # tau == N.N
    text = (f"{log.count('Step 2: calling compiler function')} graphs compiled, {len(recompiled)} recompiles"
            + (f" ({', '.join(f'{f} x{recompiled.count(f)}' for f in sorted(set(recompiled)))})" if recompiled else "")
            + f", {len(limits)} functions at the recompile limit"
            + (f" ({', '.join(limits)}: eager from then on)" if limits else "")
            + f", {len(breaks)} graph breaks")
    return text + "".join(f"\n    - recompiled on: {r}" for r in reasons[:8])


def line(log, pattern):
    found = re.findall(pattern, log)
    return found[-1].strip() if found else "(not in the log)"


print("# GPU check\n")
print("device: " + read("device.txt").strip().replace("\n", "; "))
print("\n```\n" + read("stages.txt").strip() + "\n```\n")
memory = [int(v) for v in read("gpu_memory_mib.txt").split() if v.isdigit()]
if memory:
    print(f"peak GPU memory in use (nvidia-smi, every 0.5 s): {max(memory) / 1024:.1f} GiB\n")

base = read("train_base.log")
print("## train_base.py (CUDA defaults)\n")
print("- " + line(base, r"[^\r\n]*M parameters on [^\r\n]*"))
print("- steady state: " + steady(base))
print("- whole run: " + line(base, r"trained steps [^\r\n]*") + " (its average counts the first step's compile)")
print("- " + line(base, r"step \d+/\d+: val loss[^\r\n]*"))
print("- compile: " + compiles(base))

head = read("train_head.log")
print("\n## train_head.py\n")
print("- " + line(head, r"head \d+K parameters[^\r\n]*"))
print("- steady state: " + steady(head))
print("- " + line(head, r"saved [^\r\n]*"))
print("- compile: " + compiles(head))

log = read("eval.log")
print("\n## eval.py --speed --num 150\n")
print("- " + line(log, r"one decoding step[^\r\n]*"))
print("- compile: " + compiles(log))
rows = json.loads(read("eval.json") or '{"rows": []}')["rows"]
if rows:
    print("\nms per problem (batch of 150, timed after a warm-up call; a row after a recompile-limit hit ran eager):\n")
    print("| task | rule | decoder | ms/problem | response tokens/s | mean passes | accuracy |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        rule = f"threshold {r['threshold']}" if r["rule"] == "threshold" else f"{r['tokens_per_step']} tokens/step"
        print(f"| {r['task']} | {rule} | {r['decoder']} | {r['ms_per_problem']:.2f} | "
              f"{data.GEN_LEN * 1000 / r['ms_per_problem']:,.0f} | {r['mean_passes']:.1f} | {r['accuracy']:.1%} |")
else:
    print("\nno eval.json: see eval.log")

print("\n## the race: shipped base and AR twin (eval.py --cache none,prefix,dual --latency 20 --throughput 64,256)\n")
print("- compile: " + compiles(read("race.log")))
rows = json.loads(read("race.json") or '{"rows": []}')["rows"]
if rows:
    print("\n| task | rule | decoder | accuracy | passes | TPF | ms/answer (batch 1) | answers/s (64) | answers/s (256) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rule = f"threshold {r['threshold']}" if r["rule"] == "threshold" else f"{r['tokens_per_step']} tokens/step"
        per_s, ms = r.get("answers_per_second", {}), r.get("ms_per_answer_batch1")
        cells = ["" if ms is None else f"{ms:.1f}"] + [f"{per_s[b]:,.0f}" if b in per_s else "" for b in ("64", "256")]
        print(f"| {r['task']} | {rule} | {r['decoder']} | {r['accuracy']:.1%} | {r['mean_passes']:.1f} | "
              f"{r['tokens_per_pass']:.2f} | " + " | ".join(cells) + " |")
else:
    print("\nno race.json: see race.log")
EOF
cat "$OUT/summary.md"
