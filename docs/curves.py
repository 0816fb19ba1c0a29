"""
The learning curves in docs/curves.png: validation accuracy at one token per step
against training FLOPs, one line per objective, from docs/curves.csv (the
training-time validation lines of the runs docs/LOG.md names, 64 problems a task).

    pip install matplotlib && python docs/curves.py
"""

import csv
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PANELS = [("math", "math, final answer"), ("strict", "math, strict"), ("code", "code")]
BUDGETS = (2400, 3400)  # the base's budgets in steps, before and after issue 34: dotted lines
TFLOP_PER_STEP = 0.092  # the base's step: 11.8 MFLOP per token x 7776 tokens (docs/LOG.md)
# in the csv: ProSeCo's step counts twice (two passes), the AR twin's 3% less (half the attention pairs);
# an empty cell was not measured


def main():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: docs/curves.py needs matplotlib (pip install matplotlib)")
    with open(os.path.join(HERE, "curves.csv")) as f:
        rows = list(csv.DictReader(f))
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.8), sharey=True)
    for ax, (key, title) in zip(axes, PANELS):
        for run in dict.fromkeys(r["run"] for r in rows):
            points = [(float(r["tflop"]), 100 * float(r[key])) for r in rows if r["run"] == run and r[key]]
            if points:
                ax.plot(*zip(*points), marker=".", label=run)
            else:
                ax.plot([], [], label=run)  # nothing measured: the run keeps its colour in every panel
        for steps in BUDGETS:
            ax.axvline(steps * TFLOP_PER_STEP, color="grey", linestyle=":", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("training TFLOP")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy %, 1 token/step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "curves.png"), dpi=110)
    print(f"wrote {os.path.join(HERE, 'curves.png')}")


if __name__ == "__main__":
    main()
