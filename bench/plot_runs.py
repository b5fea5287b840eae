"""Accuracy against training time for several trainer runs, in one plot (e.g. the K ablation in RESULTS.md).

    python -m bench.plot_runs runs/a runs/b --labels K=1 K=2 --out bench/results/runs.png

Each run directory's metrics.csv gives, per evaluation, the cumulative training seconds (sum of the epochs'
``seconds``) and the test accuracy of the evaluated weights (and, dashed, of the raw weights).
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path


def curve(run: Path) -> tuple[list[float], list[float], list[float]]:
    with open(run / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    seconds, total = [], 0.0
    for r in rows:
        total += float(r["seconds"])
        seconds.append(total)
    return seconds, [100 * float(r["test_acc"]) for r in rows], [100 * float(r["raw_test_acc"]) for r in rows]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run directories")
    ap.add_argument("--labels", nargs="+", help="one label per run (default: the directory names)")
    ap.add_argument("--title", default="test accuracy against training time")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = ap.parse_args(argv)
    labels = args.labels or [r.name for r in args.runs]
    if len(labels) != len(args.runs):
        ap.error("give one label per run")
    for run in args.runs:
        if not (run / "metrics.csv").is_file():
            ap.error(f"{run}: not a run directory with a metrics.csv")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run, label in zip(args.runs, labels):
        seconds, acc, raw = curve(run)
        minutes = [s / 60 for s in seconds]
        line, = ax.plot(minutes, acc, "o-", label=f"{label} (final {acc[-1]:.2f}%)")
        ax.plot(minutes, raw, "--", color=line.get_color(), alpha=0.5)
    ax.set_xlabel("training time (minutes)")
    ax.set_ylabel("test accuracy % (dashed: raw weights, no TTA)")
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
