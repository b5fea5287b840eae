"""What a run writes besides checkpoints: metrics.csv (per epoch), steps.csv (per step), curves.png, and the
per-class report of --eval-only. Every file is written to a temporary name and renamed (never half a file)."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import torch

# test_acc: the evaluated weights (the EMA when on) with the recipe's test-time augmentation -- what best.pt,
# summary.json and the time-to-accuracy milestones use; raw_test_acc: the trained weights themselves, one view.
METRIC_FIELDS = ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "raw_test_acc", "seconds",
                 "images_per_s"]
STEP_FIELDS = ["step", "epoch", "lr", "loss", "train_seconds"]


def _write_csv(rows: list[dict], fields: list[str], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in fields})
    os.replace(tmp, path)


def write_metrics(rows: list[dict], path: Path) -> None:
    _write_csv(rows, METRIC_FIELDS, path)


def write_steps(rows: list[dict], path: Path) -> None:
    _write_csv(rows, STEP_FIELDS, path)


def plot_curves(rows: list[dict], steps: list[dict], path: Path) -> None:
    """Three panels: loss per batch (and per epoch, train and test) with the learning rate, accuracy per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
    if steps:
        a.plot([s["epoch"] for s in steps], [s["loss"] for s in steps], lw=0.6, alpha=0.6, label="train (per batch)")
    ep = [r["epoch"] for r in rows]
    a.plot(ep, [r["train_loss"] for r in rows], "o-", label="train (epoch mean)")
    a.plot(ep, [r["test_loss"] for r in rows], "o-", label="test")
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.legend(), a.set_title("loss")
    if steps:
        b.plot([s["epoch"] for s in steps], [s["lr"] for s in steps])
    b.set_xlabel("epoch"), b.set_ylabel("learning rate"), b.set_title("learning rate")
    c.plot(ep, [100 * r["train_acc"] for r in rows], "o-", label="train")
    c.plot(ep, [100 * r["test_acc"] for r in rows], "o-", label="test (evaluated weights)")
    if any(r["raw_test_acc"] != r["test_acc"] for r in rows):
        c.plot(ep, [100 * r["raw_test_acc"] for r in rows], "o--", label="test (raw weights, no TTA)")
    c.set_xlabel("epoch"), c.set_ylabel("accuracy %"), c.legend(), c.set_title("accuracy")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def confusion_report(preds: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> str:
    k = len(classes)
    cm = torch.zeros(k, k, dtype=torch.int64)
    cm.index_put_((labels.cpu(), preds.cpu()), torch.ones_like(labels.cpu()), accumulate=True)
    width = max(6, max(len(c) for c in classes))
    lines = [f"{'class':{width}s} {'acc %':>7s} {'n':>6s}"]
    for i, c in enumerate(classes):
        n = int(cm[i].sum())
        lines.append(f"{c:{width}s} {100 * cm[i, i].item() / max(1, n):7.2f} {n:6d}")
    lines.append("\nconfusion matrix (rows: true, columns: predicted)")
    lines.append(" " * (width + 1) + " ".join(f"{c[:5]:>5s}" for c in classes))
    for i, c in enumerate(classes):
        lines.append(f"{c:{width}s} " + " ".join(f"{int(v):5d}" for v in cm[i]))
    return "\n".join(lines)
