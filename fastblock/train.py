"""Train CIFAR-10 networks of fastblock Blocks.

    python -m fastblock.train --data-dir ../shared/data/cifar10-jpeg.tar.gz --backend triton
    python -m fastblock.train --list-presets
    python -m fastblock.train --resume runs/fast-20261123-120000
    python -m fastblock.train --eval-only runs/fast-.../best.pt --tta
    torchrun --nproc_per_node 2 -m fastblock.train ...          (DistributedDataParallel)

Every setting comes from a preset (--preset, default "fast") and any flag given overrides it. A run directory
holds config.json, metrics.csv, last.pt / best.pt (atomic, weights_only-loadable), curves.png and summary.json.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import __version__
from .backends import accepted_names, available_backends, resolve_backend
from .data import (Cifar, DataError, atomic_torch_save, cutout, load_cifar10, progress_interval, random_affine,
                   random_crop, random_flip, split_validation)
from .models import MODELS, build_model, count_flops

# --------------------------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------------------------
BASE = dict(model="fast", epochs=10, batch_size=512, optimizer="sgd", lr=0.2, momentum=0.9, nesterov=True,
            weight_decay=5e-4, label_smoothing=0.2, schedule="linear", warmup_epochs=1.0, min_lr_ratio=0.0,
            t_max=None, crop_pad=4, flip=True, cutout=0, resized_crop=False, rotate=0.0, ema=0.99, ema_every=5,
            accum_steps=1, amp="auto", channels_last="auto", tta=True, compile=False)

PRESETS = {
    "fast": dict(description="default: the fastest route to high accuracy -- " + MODELS["fast"].description +
                 "; batch 512, SGD-Nesterov, warm-up + linear decay, label smoothing 0.2, EMA, flip TTA, crop+flip"
                 " augmentation, bf16 autocast and channels_last on GPUs (reported: 89.66% is the best coursework)"),
    "tiny": dict(description="smoke-test recipe: " + MODELS["tiny"].description + "; the fast recipe's training "
                 "settings with batch 64 and no EMA", model="tiny", epochs=3, batch_size=64, lr=0.05, ema=0.0,
                 warmup_epochs=0.0),
    "coursework-a": dict(description="config A (reported 86.85%, 12 min): " + MODELS["coursework-a"].description +
                         "; RMSprop lr 1.5e-3, cosine, batch 128, 40 epochs, no augmentation",
                         model="coursework-a", epochs=40, batch_size=128, optimizer="rmsprop", lr=1.5e-3,
                         momentum=0.0, nesterov=False, weight_decay=0.0, label_smoothing=0.0, schedule="cosine",
                         warmup_epochs=0.0, crop_pad=0, flip=False, ema=0.0, tta=False),
    "coursework-b": dict(description="config B (reported 89.66%): " + MODELS["coursework-b"].description +
                         "; label smoothing, RMSprop lr 1e-3 momentum 0.9, cosine (T_max 100, eta_min 1e-6), "
                         "batch 64, 40 epochs, random-resized-crop + rotation 15 + flip",
                         model="coursework-b", epochs=40, batch_size=64, optimizer="rmsprop", lr=1e-3, momentum=0.9,
                         nesterov=False, weight_decay=0.0, label_smoothing=0.1, schedule="cosine", t_max=100,
                         min_lr_ratio=1e-3, warmup_epochs=0.0, crop_pad=0, resized_crop=True, rotate=15.0, ema=0.0,
                         tta=False),
    "coursework-c": dict(description="config C (reported 86.35%): " + MODELS["coursework-c"].description +
                         "; Adam lr 2e-3 wd 1e-5, batch 64, 60 epochs",
                         model="coursework-c", epochs=60, batch_size=64, optimizer="adam", lr=2e-3,
                         weight_decay=1e-5, label_smoothing=0.0, schedule="constant", warmup_epochs=0.0, crop_pad=0,
                         flip=False, ema=0.0, tta=False),
    "coursework-d": dict(description="config D (reported 89.6%): " + MODELS["coursework-d"].description +
                         "; Adam lr 1e-3 wd 1e-4, cosine with 5 warm-up epochs of 50, batch 128, crop(pad 4) + flip",
                         model="coursework-d", epochs=50, batch_size=128, optimizer="adam", lr=1e-3,
                         weight_decay=1e-4, label_smoothing=0.0, schedule="cosine", warmup_epochs=5.0, ema=0.0,
                         tta=False),
    "resnet32": dict(description="config E (reported 86.77%): " + MODELS["resnet32"].description +
                     "; SGD lr 0.1 momentum 0.9 wd 1e-4, reduce-on-plateau, batch 128, 50 epochs, flip + "
                     "random-resized-crop", model="resnet32", epochs=50, batch_size=128, optimizer="sgd", lr=0.1,
                     momentum=0.9, nesterov=False, weight_decay=1e-4, label_smoothing=0.0, schedule="plateau",
                     warmup_epochs=0.0, crop_pad=0, resized_crop=True, ema=0.0, tta=False),
}


def resolve_preset(name: str) -> dict:
    if name not in PRESETS:
        raise SystemExit(f"unknown preset {name!r}; --list-presets shows {sorted(PRESETS)}")
    cfg = dict(BASE)
    cfg.update({k: v for k, v in PRESETS[name].items() if k != "description"})
    return cfg


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastblock.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--preset", default="fast", help="recipe to start from (default: fast); see --list-presets")
    add("--list-presets", action="store_true", help="list the presets and exit")
    add("--backend", default="auto", choices=accepted_names(),
        help="fastblock backend for every Block (default: auto; 'cuda' is an alias of 'extension')")
    add("--data-dir", default="data", help="cifar-10-batches-py folder, ImageFolder tree DIR/{train,test}/<class>, "
        "or a .tar.gz of one (default: ./data; downloaded there when missing and online)")
    add("--cache-dir", default=None, help="where decoded image folders are cached (default: ~/.cache/fastblock)")
    add("--no-download", action="store_true", help="never try to download CIFAR-10")
    add("--val-split", type=float, default=0.0, help="hold out this fraction of train for validation (default: 0)")
    add("--subset", type=int, default=0, help="use only the first N training and N//5 test images (smoke runs)")
    hp = p.add_argument_group("training (default: the preset's value)")
    hp.add_argument("--model", choices=sorted(MODELS), help="network")
    hp.add_argument("--epochs", type=int)
    hp.add_argument("--batch-size", type=int, help="global batch size (split across ranks)")
    hp.add_argument("--accum-steps", type=int, help="gradient accumulation steps per optimizer step")
    hp.add_argument("--lr", type=float, help="peak learning rate")
    hp.add_argument("--optimizer", choices=["sgd", "adam", "adamw", "rmsprop"])
    hp.add_argument("--momentum", type=float)
    hp.add_argument("--nesterov", action=argparse.BooleanOptionalAction)
    hp.add_argument("--weight-decay", type=float, help="not applied to BatchNorm parameters and biases")
    hp.add_argument("--label-smoothing", type=float)
    hp.add_argument("--schedule", choices=["linear", "cosine", "constant", "plateau"])
    hp.add_argument("--warmup-epochs", type=float)
    hp.add_argument("--t-max", type=float, help="cosine period in epochs (default: the run length)")
    hp.add_argument("--min-lr-ratio", type=float, help="final lr / peak lr for linear and cosine schedules")
    hp.add_argument("--crop-pad", type=int, help="random crop with this zero padding (0: off)")
    hp.add_argument("--flip", action=argparse.BooleanOptionalAction, help="random horizontal flips")
    hp.add_argument("--cutout", type=int, help="cutout square size (0: off)")
    hp.add_argument("--resized-crop", action=argparse.BooleanOptionalAction, help="random resized crop")
    hp.add_argument("--rotate", type=float, help="random rotation range in degrees")
    hp.add_argument("--ema", type=float, help="EMA decay of the weights used for evaluation (0: off)")
    hp.add_argument("--ema-every", type=int, help="update the EMA every this many steps")
    hp.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], help="autocast (auto: bf16 on GPUs, off on CPU)")
    hp.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                    help="channels-last activations and weights (default: on GPUs only; on CPU the extension "
                         "computes in NCHW and would pay a layout copy per Block)")
    hp.add_argument("--tta", action=argparse.BooleanOptionalAction, help="flip test-time augmentation")
    hp.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model")
    run = p.add_argument_group("runs")
    run.add_argument("--out", default=None, help="run directory (default: runs/<preset>-<timestamp>)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt")
    run.add_argument("--eval-only", metavar="CHECKPOINT", help="evaluate a checkpoint and print per-class results")
    run.add_argument("--stop-after", type=int, metavar="EPOCHS",
                     help="stop after this many epochs (the schedule still spans --epochs); continue with --resume")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    run.add_argument("--sync-bn", action="store_true",
                     help="under torchrun, convert plain BatchNorm2d layers (shortcuts) to SyncBatchNorm; the "
                     "fused Blocks keep per-rank batch statistics")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------
class BackendUnavailable(RuntimeError):
    """The --backend asked for cannot run on this machine (the message says why and how to fix it)."""


class Dist:
    """torchrun environment (world size 1 without it)."""

    def __init__(self, device_type: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device_type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float], device) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()


def param_groups(model: nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # BatchNorm affine parameters and biases are 1-D (Block biases are [K, Cout]; named "bias")
        (no_decay if p.dim() <= 1 or name.endswith("bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(cfg, model):
    groups = param_groups(model, cfg["weight_decay"])
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"],
                               nesterov=bool(cfg["nesterov"]) and cfg["momentum"] > 0)
    if cfg["optimizer"] == "adam":
        return torch.optim.Adam(groups, lr=cfg["lr"])
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=cfg["lr"])
    return torch.optim.RMSprop(groups, lr=cfg["lr"], momentum=cfg["momentum"])


def lr_factor(cfg, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Warm-up, then linear / cosine / constant (plateau: constant here, reduced per epoch on the eval loss)."""
    warm = cfg["warmup_epochs"] * steps_per_epoch
    if warm > 0 and step < warm:
        return (step + 1) / warm
    floor = cfg["min_lr_ratio"]
    if cfg["schedule"] == "linear":
        frac = (step - warm) / max(1.0, total_steps - warm)
        return floor + (1 - floor) * max(0.0, 1 - frac)
    if cfg["schedule"] == "cosine":
        period = (cfg["t_max"] * steps_per_epoch if cfg["t_max"] else total_steps) - warm
        frac = min(1.0, (step - warm) / max(1.0, period))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac))
    return 1.0


class EMA:
    """Exponential moving average of parameters and buffers (BatchNorm statistics included)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module):
        for e, m in zip(self.model.state_dict().values(), model.state_dict().values(), strict=True):
            if e.dtype.is_floating_point:
                e.lerp_(m, 1 - self.decay)
            else:
                e.copy_(m)


def rng_state(device_type: str) -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_pos": random.getstate()[2]}
    if device_type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, device_type: str) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    if device_type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def epoch_generator(seed: int, epoch: int, rank: int, device) -> torch.Generator:
    """Shuffling and augmentation randomness of one epoch: a pure function of (seed, epoch), so a resumed run
    draws exactly what the uninterrupted run would have."""
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1_000_003 + epoch * 101 + rank)
    return g


def augment(cfg, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if cfg["resized_crop"] or cfg["rotate"]:
        x = random_affine(x, gen, degrees=cfg["rotate"], resized_crop=cfg["resized_crop"])
    if cfg["crop_pad"]:
        x = random_crop(x, cfg["crop_pad"], gen)
    if cfg["flip"]:
        x = random_flip(x, gen)
    if cfg["cutout"]:
        x = cutout(x, cfg["cutout"], gen)
    return x


@torch.no_grad()
def evaluate(model, images, labels, mean, std, batch_size, amp_dtype, channels_last, tta, dist, device):
    """Loss, accuracy and predictions on (this rank's shard of) a uint8 image set, with optional flip TTA."""
    model.eval()
    idx = torch.arange(dist.rank, len(labels), dist.world, device=device)
    loss_sum, correct, preds = 0.0, 0, []
    for start in range(0, len(idx), batch_size):
        sel = idx[start:start + batch_size]
        x = (images[sel].float().div_(255) - mean) / std
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x).float()
            if tta:
                logits = logits + model(x.flip(3)).float()
                logits = logits / 2
        y = labels[sel]
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        pred = logits.argmax(1)
        correct += (pred == y).sum().item()
        preds.append(pred)
    total, loss_sum, correct = dist.all_sum([float(len(idx)), loss_sum, float(correct)], device)
    return loss_sum / total, correct / total, (torch.cat(preds) if preds else labels[:0])


def channels_last_for(cfg, device) -> bool:
    value = cfg["channels_last"]
    return device.type == "cuda" if value == "auto" else bool(value)


def amp_dtype_for(cfg, device) -> torch.dtype | None:
    amp = cfg["amp"]
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def plot_curves(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [r["train_loss"] for r in rows], label="train")
    a.plot(ep, [r["test_loss"] for r in rows], label="test")
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.legend(), a.set_title("loss")
    b.plot(ep, [100 * r["train_acc"] for r in rows], label="train")
    b.plot(ep, [100 * r["test_acc"] for r in rows], label="test")
    b.set_xlabel("epoch"), b.set_ylabel("accuracy %"), b.legend(), b.set_title("accuracy")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


METRIC_FIELDS = ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "seconds", "images_per_s"]


def write_metrics(rows: list[dict], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=METRIC_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in METRIC_FIELDS})
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


# --------------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------------
def resolve_config(args) -> dict:
    cfg = resolve_preset(args.preset)
    for key in list(BASE):
        val = getattr(args, key, None)
        if val is not None:
            cfg[key] = val
    cfg.update(preset=args.preset, backend=args.backend, seed=args.seed, val_split=args.val_split,
               subset=args.subset, data_dir=str(args.data_dir))
    if cfg["batch_size"] < 1 or cfg["epochs"] < 1 or cfg["accum_steps"] < 1:
        raise SystemExit("--batch-size, --epochs and --accum-steps must be >= 1")
    return cfg


def load_data(cfg, args, dist) -> Cifar:
    data = load_cifar10(cfg["data_dir"], args.cache_dir, download=not args.no_download,
                        progress=dist.main and not args.no_progress)
    if cfg["subset"]:
        n = cfg["subset"]
        data = Cifar(data.train_x[:n], data.train_y[:n], data.test_x[:max(1, n // 5)], data.test_y[:max(1, n // 5)],
                     data.classes, data.source + f" (subset {n})")
    if cfg["val_split"]:
        data = split_validation(data, cfg["val_split"], cfg["seed"])
    return data


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_presets:
        for name, p in PRESETS.items():
            print(f"{name:14s} {p['description']}")
        return 0
    try:
        return run(args)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BackendUnavailable as exc:
        print(f"error: {exc}\n(--backend auto picks the best backend this machine has)", file=sys.stderr)
        return 2


def run(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dist = Dist(device.type)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    say = print if dist.main else (lambda *a, **k: None)

    if args.eval_only:
        return eval_only(args, device, dist, say)

    resume_dir = Path(args.resume) if args.resume else None
    state = None
    if resume_dir:
        ckpt = resume_dir / "last.pt"
        if not ckpt.exists():
            raise SystemExit(f"--resume: no last.pt in {resume_dir}")
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        cfg = json.loads((resume_dir / "config.json").read_text())["config"]
        run_dir = resume_dir
    else:
        cfg = resolve_config(args)
        run_dir = Path(args.out or f"runs/{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}")

    random.seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    try:
        backend_name = resolve_backend(cfg["backend"], device)
    except RuntimeError as exc:
        raise BackendUnavailable(str(exc)) from None
    report = available_backends(device)
    say(f"backend: {backend_name} (requested {cfg['backend']}; {report[backend_name].reason})")
    for name, st in report.items():
        if name != backend_name:
            say(f"  {name}: {st}")
    say(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                               f" ({torch.get_num_threads()} threads)") + (f", {dist.world} ranks" if dist.world > 1 else ""))

    data = load_data(cfg, args, dist)
    say(f"data: {data.source}: {len(data.train_y)} train, {len(data.test_y)} "
        f"{'validation' if cfg['val_split'] else 'test'} images")
    mean, std = (t.to(device).view(1, 3, 1, 1) for t in data.mean_std)
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    test_x, test_y = data.test_x.to(device), data.test_y.to(device)

    model = build_model(cfg["model"], backend=cfg["backend"]).to(device)
    channels_last = channels_last_for(cfg, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in model.parameters())
    flops = count_flops(model)
    say(f"model: {cfg['model']}: {n_params / 1e6:.2f} M parameters, {flops / 1e6:.1f} MFLOPs per image")
    if dist.world > 1 and args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ema = EMA(model, cfg["ema"]) if cfg["ema"] else None
    opt = make_optimizer(cfg, model)
    train_model = model
    if dist.world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg["compile"]:
        train_model = torch.compile(train_model)
    amp_dtype = amp_dtype_for(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=5) \
        if cfg["schedule"] == "plateau" else None

    global_batch = cfg["batch_size"]
    local_batch = max(1, global_batch // dist.world)
    micro = max(1, local_batch // cfg["accum_steps"])
    steps_per_epoch = max(1, len(train_y) // global_batch)
    total_steps = steps_per_epoch * cfg["epochs"]
    rows, best_acc, start_epoch, train_seconds = [], 0.0, 0, 0.0
    milestones = {}
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.model.load_state_dict(state["ema"])
        if plateau is not None and state.get("plateau"):
            plateau.load_state_dict(state["plateau"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], device.type)
        rows, best_acc, start_epoch = state["rows"], state["best_acc"], state["epoch"] + 1
        train_seconds, milestones = state["train_seconds"], state["milestones"]
        say(f"resumed {run_dir} after epoch {state['epoch'] + 1}")
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if state is None:
            meta = {"config": cfg, "fastblock": __version__, "torch": torch.__version__, "python": platform.python_version(),
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                    "backend": backend_name, "world_size": dist.world, "parameters": n_params,
                    "flops_per_image": flops, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            (run_dir / "config.json").write_text(json.dumps(meta, indent=2))
        say(f"run directory: {run_dir}")

    from tqdm.auto import tqdm

    last_epoch = cfg["epochs"] if not args.stop_after else min(cfg["epochs"], args.stop_after)
    for epoch in range(start_epoch, last_epoch):
        train_model.train()
        gen = epoch_generator(cfg["seed"], epoch, 0, device)
        perm = torch.randperm(len(train_y), device=device, generator=gen)
        t0 = time.perf_counter()
        loss_sum = correct = seen = 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg['epochs']}", leave=False,
                   disable=not dist.main or args.no_progress, unit="step", mininterval=progress_interval())
        for step in bar:
            global_step = epoch * steps_per_epoch + step
            factor = lr_factor(cfg, global_step, total_steps, steps_per_epoch)
            for group in opt.param_groups:
                group["lr"] = group.setdefault("base_lr", cfg["lr"]) * factor if plateau is None else group["lr"]
            batch = perm[step * global_batch:(step + 1) * global_batch][dist.rank * local_batch:(dist.rank + 1) * local_batch]
            x_all = augment(cfg, train_x[batch].float().div_(255), gen)
            x_all = (x_all - mean) / std
            y_all = train_y[batch]
            opt.zero_grad(set_to_none=True)
            for m0 in range(0, len(batch), micro):
                x, y = x_all[m0:m0 + micro], y_all[m0:m0 + micro]
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    logits = train_model(x)
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg["label_smoothing"])
                scaler.scale(loss * len(x) / len(batch)).backward()
                loss_sum += loss.item() * len(x)
                correct += (logits.argmax(1) == y).sum().item()
                seen += len(x)
            scaler.step(opt)
            scaler.update()
            if ema is not None and (global_step + 1) % cfg["ema_every"] == 0:
                ema.update(model)
            if dist.main and not args.no_progress:
                elapsed = time.perf_counter() - t0
                bar.set_postfix(loss=f"{loss_sum / max(1, seen):.3f}", acc=f"{100 * correct / max(1, seen):.1f}",
                                img_s=f"{seen * dist.world / max(elapsed, 1e-9):.0f}")
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_time = time.perf_counter() - t0
        train_seconds += epoch_time
        seen_all, loss_all, correct_all = dist.all_sum([seen, loss_sum, correct], device)
        if ema is not None:
            ema.update(model)
        eval_model = ema.model if ema is not None else model
        test_loss, test_acc, _ = evaluate(eval_model, test_x, test_y, mean, std, 1024, amp_dtype,
                                          channels_last, cfg["tta"], dist, device)
        if plateau is not None:
            plateau.step(test_loss)
        row = dict(epoch=epoch + 1, lr=opt.param_groups[0]["lr"], train_loss=loss_all / seen_all,
                   train_acc=correct_all / seen_all, test_loss=test_loss, test_acc=test_acc,
                   seconds=round(epoch_time, 3), images_per_s=round(seen_all / epoch_time, 1))
        rows.append(row)
        for target in (0.80, 0.85, 0.90, 0.93, 0.94):
            if test_acc >= target and str(target) not in milestones:
                milestones[str(target)] = round(train_seconds, 2)
        is_best = test_acc > best_acc
        best_acc = max(best_acc, test_acc)
        say(f"epoch {epoch + 1:3d}/{cfg['epochs']}  lr {row['lr']:.4g}  train loss {row['train_loss']:.4f} "
            f"acc {100 * row['train_acc']:.2f}%  |  {'val' if cfg['val_split'] else 'test'} loss {test_loss:.4f} "
            f"acc {100 * test_acc:.2f}%  |  {epoch_time:.1f}s  {row['images_per_s']:.0f} img/s")
        if dist.main:
            ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                    "ema": ema.model.state_dict() if ema is not None else None,
                    "plateau": plateau.state_dict() if plateau is not None else None, "scaler": scaler.state_dict(),
                    "rng": rng_state(device.type), "epoch": epoch, "rows": rows, "best_acc": best_acc,
                    "train_seconds": train_seconds, "milestones": milestones, "config": cfg}
            atomic_torch_save(ckpt, run_dir / "last.pt")
            if is_best:
                atomic_torch_save({"model": eval_model.state_dict(), "config": cfg, "epoch": epoch,
                                   "test_acc": test_acc, "classes": data.classes}, run_dir / "best.pt")
            write_metrics(rows, run_dir / "metrics.csv")
            plot_curves(rows, run_dir / "curves.png")
            summary = {"final_test_acc": test_acc, "best_test_acc": best_acc, "epochs": epoch + 1,
                       "train_seconds": round(train_seconds, 2), "time_to_accuracy_s": milestones,
                       "backend": backend_name, "device": str(device)}
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    say(f"done: final accuracy {100 * rows[-1]['test_acc']:.2f}%, best {100 * best_acc:.2f}%, "
        f"{train_seconds:.1f}s of training; results in {run_dir}")
    if dist.world > 1:
        torch.distributed.destroy_process_group()
    return 0


def eval_only(args, device, dist, say) -> int:
    ckpt_path = Path(args.eval_only)
    if not ckpt_path.exists():
        raise SystemExit(f"--eval-only: no checkpoint at {ckpt_path}")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    cfg = dict(ckpt["config"])
    if args.data_dir != "data" or "data_dir" not in cfg:
        cfg["data_dir"] = args.data_dir
    cfg["val_split"], cfg["subset"] = cfg.get("val_split", 0.0), args.subset or cfg.get("subset", 0)
    model = build_model(cfg["model"], backend=args.backend).to(device)
    state = ckpt["model"] if "ema" not in ckpt or ckpt.get("ema") is None else ckpt["ema"]
    model.load_state_dict(state)
    data = load_data(cfg, args, dist)
    mean, std = (t.to(device).view(1, 3, 1, 1) for t in data.mean_std)
    tta = cfg.get("tta", False) if args.tta is None else args.tta
    loss, acc, preds = evaluate(model, data.test_x.to(device), data.test_y.to(device), mean, std, 1024,
                                amp_dtype_for(cfg, device), False, tta, dist, device)
    say(f"{ckpt_path}: {'validation' if cfg['val_split'] else 'test'} accuracy {100 * acc:.2f}%  loss {loss:.4f}"
        f"  ({len(data.test_y)} images, TTA {'on' if tta else 'off'})")
    if dist.world == 1:
        say(confusion_report(preds, data.test_y.to(device), data.classes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
