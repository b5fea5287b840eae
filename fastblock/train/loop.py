"""The training run, in small pieces: build the parts, resume them, train steps, evaluate, save.

A run's randomness is a pure function of (seed, epoch): shuffling and augmentation of epoch e come from one
generator seeded with both, so a resumed run -- from an epoch boundary or from the middle of an epoch, where the
generator's state is saved -- draws exactly what the uninterrupted run would have.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import signal
import statistics
import time
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .. import __version__
from ..backends import available_backends, resolve_backend
from ..data import (Cifar, DataError, atomic_torch_save, balanced_subset, cutout, load_cifar10, progress_interval,
                    CIFAR_SIZE, random_affine, random_crop, random_flip, split_validation)
from ..models import build_model, count_flops
from ..modules import Block
from .optim import MuonSGD
from .presets import SETTINGS, default_preset, recipe_defaults, resolve_preset
from .records import confusion_report, plot_curves, write_metrics, write_steps

CHECKPOINT_KEYS = {"model", "config"}
PROBE_STEPS = 5  # timed steps (after one warm-up step) behind the projected training time


class RunError(RuntimeError):
    """A problem with the command line or a run directory the user can fix; the message says how."""


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


# --------------------------------------------------------------------------------------------------------------
# parts
# --------------------------------------------------------------------------------------------------------------
def param_groups(model: nn.Module, weight_decay: float, bn_bias_lr_scale: float = 1.0):
    """[decayed weights, undecayed biases and BatchNorm parameters] -- and with ``bn_bias_lr_scale`` != 1 a third
    group, the BatchNorm biases, whose "lr_scale" make_optimizer turns into their learning rate, with weight decay
    divided by it: the same decay per step as the weights, which keeps the fast-moving shifts bounded.
    (_BatchNorm: SyncBatchNorm too, which --sync-bn converts to before the optimizer is built.)"""
    bn_biases = {id(m.bias) for m in model.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.bias is not None}
    decay, no_decay, fast = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if bn_bias_lr_scale != 1.0 and id(p) in bn_biases:
            fast.append(p)
        # BatchNorm affine parameters and biases are 1-D (Block biases are [K, Cout]; named "bias")
        elif p.dim() <= 1 or name.endswith("bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if fast:
        groups.append({"params": fast, "weight_decay": weight_decay / bn_bias_lr_scale,
                       "lr_scale": bn_bias_lr_scale})
    return groups


def make_optimizer(cfg, model):
    groups = param_groups(model, cfg["weight_decay"], cfg["bn_bias_lr_scale"])
    for g in groups:
        g["lr"] = cfg["lr"] * g.pop("lr_scale", 1.0)
    if cfg["optimizer"] == "muon":  # the Blocks' filters move to a Muon group of their own
        filters = [m.weight for m in model.modules() if isinstance(m, Block) and m.weight.requires_grad]
        ids = {id(p) for p in filters}
        for g in groups:
            g["params"] = [p for p in g["params"] if id(p) not in ids]
        groups.append({"params": filters, "lr": cfg["muon_lr"], "momentum": cfg["muon_momentum"],
                       "weight_decay": 0.0, "muon": True})
    if cfg["optimizer"] in ("sgd", "muon"):
        sgd = MuonSGD if cfg["optimizer"] == "muon" else torch.optim.SGD
        return sgd(groups, lr=cfg["lr"], momentum=cfg["momentum"],
                   nesterov=bool(cfg["nesterov"]) and cfg["momentum"] > 0)
    if cfg["optimizer"] == "adam":
        return torch.optim.Adam(groups, lr=cfg["lr"])
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=cfg["lr"])
    return torch.optim.RMSprop(groups, lr=cfg["lr"], momentum=cfg["momentum"])


@dataclasses.dataclass
class Plan:
    """Step counts of the run. total_steps may be re-planned (--time-budget); the learning-rate schedule keeps the
    length in steps it was laid out over, and a re-plan maps the steps still to run onto what is left of it: the
    rate goes on from where it stands instead of jumping to where the new length would have put it."""

    steps_per_epoch: int
    total_steps: int
    schedule_steps: int = 0       # the schedule's length (0: total_steps)
    replan_step: int = 0          # the step of the last re-plan ...
    replan_position: float = 0.0  # ... and where in the schedule it stood

    def __post_init__(self):
        self.schedule_steps = self.schedule_steps or self.total_steps

    def position(self, step: float) -> float:
        """Where the run's step ``step`` falls in the schedule (in the schedule's steps)."""
        left = self.total_steps - self.replan_step
        if left <= 0:
            return float(self.schedule_steps)
        return self.replan_position + (step - self.replan_step) * (self.schedule_steps - self.replan_position) / left

    def replan(self, total_steps: int, steps_done: int) -> None:
        """The run now ends after total_steps steps; the schedule continues from where steps_done left it."""
        self.replan_position = self.position(steps_done)
        self.replan_step = steps_done
        self.total_steps = total_steps


def warmup_steps(cfg, plan: Plan) -> float:
    if cfg["warmup_fraction"]:
        return cfg["warmup_fraction"] * plan.schedule_steps
    return cfg["warmup_epochs"] * plan.steps_per_epoch


def lr_factor(cfg, plan: Plan, step: int) -> float:
    """Warm-up from ``warmup_start`` to 1, then linear / cosine / constant down to ``min_lr_ratio`` (plateau:
    constant here, reduced per epoch on the eval loss), over the schedule's steps (Plan.position)."""
    pos, length = plan.position(step), plan.schedule_steps
    warm = warmup_steps(cfg, plan)
    if warm > 0 and pos < warm:
        start = cfg["warmup_start"]
        return start + (1 - start) * (pos + 1) / warm
    floor = cfg["min_lr_ratio"]
    if cfg["schedule"] == "linear":
        frac = (pos - warm) / max(1.0, length - warm)
        return floor + (1 - floor) * max(0.0, 1 - frac)
    if cfg["schedule"] == "cosine":
        period = (cfg["t_max"] * plan.steps_per_epoch if cfg["t_max"] else length) - warm
        frac = min(1.0, (pos - warm) / max(1.0, period))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac))
    return 1.0


def make_ema(model: nn.Module, decay: float, warmup: bool) -> AveragedModel:
    """Exponential moving average of parameters and buffers (BatchNorm statistics included), with the decay warmed
    up as min(decay, (1 + n) / (10 + n)) over the first n updates: early averages follow the trained weights
    instead of holding on to the random initialisation."""
    def multi_avg_fn(averaged, current, num_averaged):
        n = int(num_averaged)
        get_ema_multi_avg_fn(min(decay, (1 + n) / (10 + n)) if warmup else decay)(averaged, current, num_averaged)

    return AveragedModel(model, multi_avg_fn=multi_avg_fn, use_buffers=True)


def lookahead_decay(cfg, plan: Plan, step: int) -> float:
    """Lookahead's decay after ``step`` steps: ``ema`` x (fraction of the run done)^3 -- next to no averaging while
    the learning rate is high, the full decay at the end."""
    return cfg["ema"] * min(1.0, plan.position(step) / plan.schedule_steps) ** 3


@torch.no_grad()
def lookahead_update(averaged: AveragedModel, model: nn.Module, decay: float) -> None:
    """averaged <- decay * averaged + (1 - decay) * model (parameters and floating-point buffers), then the model
    continues from the average."""
    def tensors(m):
        return [t for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()]

    avg, cur = tensors(averaged.module), tensors(model)
    torch._foreach_lerp_(avg, cur, 1.0 - decay)
    torch._foreach_copy_(cur, avg)
    averaged.n_averaged += 1


def cpu_bf16_native() -> Optional[str]:
    """The CPU's native bf16 matrix instructions (AMX, else AVX512-BF16) that oneDNN's bf16 convolutions use, or
    None where bf16 would be emulated (slower than float32)."""
    for name, probe in (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported")):
        try:
            if getattr(torch.cpu, probe)():
                return name
        except (AttributeError, RuntimeError):
            pass
    return None


def amp_dtype_for(cfg, device) -> Optional[torch.dtype]:
    """--amp auto: bf16 autocast on GPUs that compute it natively (compute capability 8.0 and up), fp16 with a
    GradScaler on older GPUs; on CPU bf16 where the CPU has bf16 matrix instructions, else float32."""
    amp = cfg["amp"]
    if amp == "auto":
        if device.type == "cuda":
            amp = "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp16"
        else:
            amp = "bf16" if device.type == "cpu" and cpu_bf16_native() else "off"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def channels_last_for(cfg, device, model: Optional[nn.Module] = None) -> bool:
    """--channels-last auto: on GPUs; on CPUs training in bf16 (oneDNN's channels-last bf16 convolutions are the
    fast ones there); on CPUs training in float32 when every Block of `model` is K=1 (plain convolutions, faster
    channels-last there too; a K>=2 Block's channels-last schedule first writes the K-fold expanded input, and
    such networks ran faster NCHW: bench/RESULTS.md)."""
    value = cfg["channels_last"]
    if value != "auto":
        return bool(value)
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    if amp_dtype_for(cfg, device) == torch.bfloat16:
        return True
    blocks = [m for m in model.modules() if isinstance(m, Block)] if model is not None else []
    return bool(blocks) and all(b.num_convs == 1 for b in blocks)


def precision_note(cfg, device) -> str:
    amp = amp_dtype_for(cfg, device)
    if amp is None:
        return "float32"
    what = "bf16 autocast" if amp == torch.bfloat16 else "fp16 autocast + GradScaler"
    if cfg["amp"] == "auto":
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            why = "native bf16" if amp == torch.bfloat16 else "no native bf16"
            what += f" (compute capability {major}.{minor}: {why})"
        else:
            what += f" (CPU with {cpu_bf16_native()}: native bf16)"
    elif device.type == "cpu" and amp == torch.bfloat16 and not cpu_bf16_native():
        # oneDNN has no bf16 kernels without AVX512-BF16/AMX: ~10x float32's step time (bench/RESULTS.md)
        what += (" -- this CPU has no bf16 matrix instructions, so bf16 is emulated: expect ~10x the step time of "
                 "--amp off")
    return what


AMP_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "off"}


def keep_run_choices(cfg, state: dict, device, say) -> dict:
    """The settings a resumed run's precision and layout follow: what the run began with (its checkpoint records
    what --amp and --channels-last "auto" chose), so that it continues bit for bit where "auto" would now choose
    otherwise -- another CPU, a newer rule. Checkpoints from before the record, or a run moved to another kind of
    device, choose afresh."""
    began = state.get("choices")
    if not began:
        return cfg
    if began["device_type"] != device.type:
        say(f"resumed on {device.type}, begun on {began['device_type']}: precision and layout are chosen afresh")
        return cfg
    cfg = dict(cfg, amp=began["amp"], channels_last=began["channels_last"])
    say(f"precision and layout as the run began: {precision_note(cfg, device)}, "
        f"{'channels-last' if began['channels_last'] else 'NCHW'}")
    return cfg


def epoch_generator(seed: int, epoch: int, rank: int, device) -> torch.Generator:
    """Shuffling and augmentation randomness of one epoch: a pure function of (seed, epoch)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1_000_003 + epoch * 101 + rank)
    return g


def flip_parity(n: int, seed: int, device) -> torch.Tensor:
    """Per image, whether it is flipped in even epochs ("alternate" flips: odd epochs show the other side)."""
    g = torch.Generator(device="cpu").manual_seed(seed * 7919 + 17)
    return (torch.rand(n, generator=g) < 0.5).to(device)


def augment(cfg, x: torch.Tensor, gen: torch.Generator, flips: Optional[torch.Tensor] = None,
            small_crop: bool = False) -> torch.Tensor:
    """``flips``: this batch's images' flip decisions for "alternate" flipping (else random flips); ``small_crop``:
    end with a random window of each augmented image, cfg["small_crop"] pixels square (--small-crop)."""
    if cfg["resized_crop"] or cfg["rotate"]:
        x = random_affine(x, gen, degrees=cfg["rotate"], resized_crop=cfg["resized_crop"])
    if cfg["crop_pad"]:
        x = random_crop(x, cfg["crop_pad"], gen)
    if cfg["flip"] == "alternate" and flips is not None:
        x = torch.where(flips[:, None, None, None], x.flip(3), x)
    elif cfg["flip"]:
        x = random_flip(x, gen)
    if cfg["cutout"]:
        x = cutout(x, cfg["cutout"], gen)
    if small_crop:
        x = random_crop(x, 0, gen, size=cfg["small_crop"])
    return x


# --small-crop: the first steps train on small windows of the images, which cost about their share of the pixels
# (bench/RESULTS.md). The time budget plans in full-size steps: a small-crop step counts as (S / 32)^2 of one.
MIN_SMALL_CROP = 16  # every network in models.MODELS takes 16x16 images (tests/test_train.py checks)


def small_crop_steps(cfg, plan: Plan) -> int:
    """How many steps at the start of the run train on --small-crop windows."""
    return round(cfg["small_crop_epochs"] * plan.steps_per_epoch) if cfg["small_crop"] else 0


def _small_crop_share(cfg) -> float:
    return (cfg["small_crop"] / CIFAR_SIZE) ** 2


def step_cost(cfg, plan: Plan, start: int, end: int) -> float:
    """The steps start..end-1 in full-size steps (a small-crop step: its share of the pixels)."""
    cheap = max(0, min(end, small_crop_steps(cfg, plan)) - start)
    return cheap * _small_crop_share(cfg) + (end - start - cheap)


def steps_within(cfg, plan: Plan, start: int, cost: float) -> int:
    """How many steps from step ``start`` on fit in ``cost`` full-size steps."""
    cheap = max(0, small_crop_steps(cfg, plan) - start)
    if cheap:
        if cost < cheap * _small_crop_share(cfg):
            return int(cost / _small_crop_share(cfg))
        cost -= cheap * _small_crop_share(cfg)
    return cheap + int(cost)


# The test-time augmentations beyond flips (tta=True) and none (tta=False), by name: tta_views builds their views.
TTA_MODES = ("flip-translate", "flip-translate-all")


def tta_views(x: torch.Tensor, tta) -> list[tuple[float, torch.Tensor]]:
    """(weight, view) pairs whose weighted logits are averaged. "flip-translate": the image and its mirror at half
    the weight, and both shifted by one pixel up-left and down-right (reflect padding) at a quarter each --
    symmetric shifts, the unshifted view weighted most (bench/RESULTS.md compares it with alternatives).
    "flip-translate-all": the image and its mirror at each of the nine shifts by -1/0/+1 pixels, equal weights
    (18 views: three times the evaluation work of "flip-translate")."""
    if not tta:
        return [(1.0, x)]
    if tta is True:
        return [(0.5, x), (0.5, x.flip(3))]
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be True, False or one of {TTA_MODES}, got {tta!r}")
    h, w = x.shape[2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    if tta == "flip-translate-all":  # the unshifted crop is x itself, so evaluate finds the plain view
        shifted = [x if (i, j) == (1, 1) else padded[:, :, i:i + h, j:j + w] for i in range(3) for j in range(3)]
        return [(1 / 18, view) for s in shifted for view in (s, s.flip(3))]
    views = [(0.25, x), (0.25, x.flip(3))]
    for shifted in (padded[:, :, :h, :w], padded[:, :, 2:, 2:]):
        views += [(0.125, shifted), (0.125, shifted.flip(3))]
    return views


class Evaluation(NamedTuple):
    loss: float
    acc: float         # with the TTA views averaged
    preds: torch.Tensor
    plain_acc: float   # the unaugmented view's logits alone (one of the TTA views, so it costs nothing extra)


@torch.no_grad()
def evaluate(model, images, labels, mean, std, batch_size, amp_dtype, channels_last, tta, dist,
             device) -> Evaluation:
    """Loss, accuracy and predictions on (this rank's shard of) a uint8 image set, with optional TTA."""
    model.eval()
    idx = torch.arange(dist.rank, len(labels), dist.world, device=device)
    loss_sum, correct, plain_correct, preds = 0.0, 0, 0, []
    for start in range(0, len(idx), batch_size):
        sel = idx[start:start + batch_size]
        x = (images[sel].float().div_(255) - mean) / std
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = labels[sel]
        logits = 0
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            for weight, view in tta_views(x, tta):
                view_logits = model(view).float()
                if view is x:
                    plain_correct += (view_logits.argmax(1) == y).sum().item()
                logits = logits + weight * view_logits
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        pred = logits.argmax(1)
        correct += (pred == y).sum().item()
        preds.append(pred)
    total, loss_sum, correct, plain_correct = dist.all_sum(
        [float(len(idx)), loss_sum, float(correct), float(plain_correct)], device)
    return Evaluation(loss_sum / total, correct / total, torch.cat(preds) if preds else labels[:0],
                      plain_correct / total)


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


def resolve_config(args, device: torch.device, say) -> dict:
    """The run's settings: the preset (given, or the default for this device) overridden by every flag given."""
    preset, why = default_preset(device) if args.preset is None else (args.preset, "")
    cfg = resolve_preset(preset)
    for key in SETTINGS:
        val = getattr(args, key, None)
        if val is not None:
            cfg[key] = val
    say(f"preset: {preset}" + (f" (the default here: {why}; --preset chooses another)" if why else "") +
        f"; precision: {precision_note(cfg, device)}")
    cfg.update(preset=preset, backend=args.backend, seed=args.seed, val_split=args.val_split,
               subset=args.subset, data_dir=str(args.data_dir))
    if cfg["batch_size"] < 1 or cfg["epochs"] <= 0 or cfg["accum_steps"] < 1:
        raise RunError("--batch-size and --accum-steps must be >= 1, --epochs > 0")
    if cfg["small_crop"] and not MIN_SMALL_CROP <= cfg["small_crop"] < CIFAR_SIZE:
        raise RunError(f"--small-crop must be from {MIN_SMALL_CROP} to {CIFAR_SIZE - 1} pixels (0: off), got "
                       f"{cfg['small_crop']}")
    if cfg["small_crop"] and cfg["small_crop_epochs"] <= 0:
        raise RunError(f"--small-crop {cfg['small_crop']} needs --small-crop-epochs > 0 (how long it lasts)")
    return cfg


# --------------------------------------------------------------------------------------------------------------
# data, run directory, checkpoints
# --------------------------------------------------------------------------------------------------------------
# The options --resume and --eval-only take (given any other, they would ignore it: refused instead).
RUN_OPTIONS = {"data_dir", "cache_dir", "no_download", "no_progress", "device", "backend"}
RESUME_OPTIONS = RUN_OPTIONS | {"resume", "epochs", "checkpoint_minutes", "stop_after"}
EVAL_ONLY_OPTIONS = RUN_OPTIONS | {"eval_only", "tta", "subset"}


def refuse_ignored_options(args, accepted: set, what: str, may: str) -> None:
    ignored = sorted(args.given - accepted)
    if ignored:
        names = ", ".join("--" + k.replace("_", "-") for k in ignored)
        raise RunError(f"{what}: {names} would be ignored ({may})")


def load_data(cfg, args, dist) -> Cifar:
    data = load_cifar10(cfg["data_dir"], args.cache_dir, download=not args.no_download,
                        progress=dist.main and not args.no_progress)
    if cfg["subset"]:
        data = balanced_subset(data, cfg["subset"], cfg["seed"])
    if cfg["val_split"]:
        data = split_validation(data, cfg["val_split"], cfg["seed"])
    return data


def new_run_dir(args, preset: str) -> Path:
    """A fresh run directory: --out when given (it must not hold a run yet), else runs/<preset>-<time>."""
    if args.out:
        out = Path(args.out)
        if out.exists() and any(out.iterdir()):
            hint = (f"continue it with --resume {out}" if (out / "last.pt").exists() else "choose another --out")
            raise RunError(f"--out {out} already holds files; a run never writes over another: {hint}")
        return out
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path("runs") / f"{preset}-{stamp}"
    suffix = 1
    while out.exists():
        out, suffix = Path("runs") / f"{preset}-{stamp}-{suffix}", suffix + 1
    return out


def load_checkpoint(path: Path, what: str) -> dict:
    """A fastblock checkpoint, or a one-line RunError saying why ``path`` is not one."""
    if path.is_dir():
        raise RunError(f"{what}: {path} is a directory")
    if not path.exists():
        raise RunError(f"{what}: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RunError(f"{what}: {path} is not a fastblock checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or not CHECKPOINT_KEYS <= set(ckpt):
        raise RunError(f"{what}: {path} is not a fastblock checkpoint (no model and config inside)")
    return ckpt


@dataclasses.dataclass
class Progress:
    """Where the run stands; saved in every checkpoint."""

    epoch: int = 0                 # the epoch in progress (0-based)
    step_in_epoch: int = 0         # steps of it already done
    rows: list = dataclasses.field(default_factory=list)    # metrics.csv
    steps: list = dataclasses.field(default_factory=list)   # steps.csv
    best_acc: float = 0.0
    train_seconds: float = 0.0
    milestones: dict = dataclasses.field(default_factory=dict)
    epoch_sums: tuple = (0.0, 0.0, 0.0, 0.0)  # loss sum, correct, seen, seconds of the epoch in progress
    gen_state: Optional[torch.Tensor] = None  # the epoch generator's state after step_in_epoch steps


# --------------------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------------------
def run(args, say) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dist = Dist(device.type)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if not dist.main:
        say = lambda *a, **k: None  # noqa: E731
    if args.eval_only:
        return eval_only(args, device, dist, say)

    state, progress = None, Progress()
    if args.resume:
        refuse_ignored_options(args, RESUME_OPTIONS, "--resume continues a run with the settings it began with",
                               "--epochs extends it; --data-dir, --backend and --device say where it goes on")
        run_dir = Path(args.resume)
        state = load_checkpoint(run_dir / "last.pt", "--resume")
        cfg = {**recipe_defaults(), **state["config"]}  # settings added since the run began keep their defaults
        for key in ("data_dir", "backend"):  # where the run goes on: the data moved, another machine
            if key in args.given and getattr(args, key) != cfg[key]:
                say(f"--{key.replace('_', '-')} {getattr(args, key)} (the run began with {cfg[key]})")
                cfg[key] = getattr(args, key)
        progress = Progress(**state["progress"])
        saved_plan = state["plan"]
        if args.epochs is None and (progress.epoch * saved_plan["steps_per_epoch"] + progress.step_in_epoch
                                    >= saved_plan["total_steps"]):
            last = progress.rows[-1]
            say(f"nothing to do: the run in {run_dir} is complete ({last['epoch']:g} epochs, final accuracy "
                f"{100 * last['test_acc']:.2f}%); --epochs extends it")
            return 0
        if args.epochs is not None and args.epochs != cfg["epochs"]:
            if args.epochs < progress.epoch + progress.step_in_epoch / max(1, saved_plan["steps_per_epoch"]):
                raise RunError(f"--epochs {args.epochs:g}: the run in {run_dir} is already past that point")
            say(f"extending the run from {cfg['epochs']:g} to {args.epochs:g} epochs: the learning-rate schedule is "
                "re-planned over the new length from the next step on")
            cfg["epochs"] = args.epochs
    else:
        cfg = resolve_config(args, device, say)
        run_dir = new_run_dir(args, cfg["preset"])

    random.seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    # the settings "auto" resolves from (cfg itself keeps "auto", as the user gave it)
    chosen = keep_run_choices(cfg, state, device, say) if state is not None else cfg
    amp_dtype = amp_dtype_for(chosen, device)
    backend_name = pick_backend(cfg["backend"], device, amp_dtype or torch.float32, say)
    say(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                               f" ({torch.get_num_threads()} threads)") +
        (f", {dist.world} ranks" if dist.world > 1 else ""))

    data = load_data(cfg, args, dist)
    say(f"data: {data.source}: {len(data.train_y)} train, {len(data.test_y)} "
        f"{'validation' if cfg['val_split'] else 'test'} images")
    mean, std = (t.to(device).view(1, 3, 1, 1) for t in data.mean_std)
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    test_x, test_y = data.test_x.to(device), data.test_y.to(device)

    model = build_model(cfg["model"], backend=cfg["backend"]).to(device)
    if state is None and hasattr(model, "fit_to_data"):  # e.g. patch whitening, fitted on training images
        sample = train_x[torch.randperm(len(train_x), generator=torch.Generator().manual_seed(cfg["seed"]))[:5000]
                         .to(device)]
        model.fit_to_data((sample.float().div_(255) - mean) / std)
    if state is None and cfg["dirac"]:
        if hasattr(model, "dirac_init_"):
            model.dirac_init_()
        else:
            say(f"dirac: model {cfg['model']!r} has no identity initialisation (the air-* models do); it keeps its "
                "random one")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            if cfg["freeze_bn_weight"] and m.weight is not None:
                m.weight.requires_grad_(False)
            if cfg["bn_momentum"] is not None:
                m.momentum = cfg["bn_momentum"]
    channels_last = channels_last_for(chosen, device, model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in model.parameters())
    flops = count_flops(model)
    say(f"model: {cfg['model']}: {n_params / 1e6:.2f} M parameters, {flops / 1e6:.1f} MFLOPs per image, "
        f"{'channels-last' if channels_last else 'NCHW'}")
    if dist.world > 1 and args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ema = make_ema(model, cfg["ema"], cfg["ema_warmup"]) if cfg["ema"] else None
    opt = make_optimizer(cfg, model)
    train_model = model
    if dist.world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg["compile"]:
        train_model = torch.compile(train_model)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    global_batch = cfg["batch_size"]
    local_batch = max(1, global_batch // dist.world)
    steps_per_epoch = max(1, len(train_y) // global_batch)
    plan = Plan(steps_per_epoch, max(1, round(cfg["epochs"] * steps_per_epoch)))
    if state is not None:
        saved = Plan(**state["plan"])  # with the re-plans of a --time-budget run
        if args.epochs is None or saved.total_steps == plan.total_steps:
            plan = saved  # (a run extended by --epochs gets a new schedule over its new length instead)
    small_steps = small_crop_steps(cfg, plan)
    if small_steps and state is None:
        whole = " -- the whole run" if small_steps >= plan.total_steps else ""
        epochs = f"{cfg['small_crop_epochs']:g} epoch" + ("" if cfg["small_crop_epochs"] == 1 else "s")
        say(f"small crops: the first {epochs} ({small_steps} steps) train "
            f"on random {cfg['small_crop']}x{cfg['small_crop']} windows of the images{whole}; evaluation sees them "
            f"whole")
    if cfg["schedule"] == "plateau":  # the learning rate follows the evaluation loss, not the step
        scheduler = None
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=5)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(cfg, plan, step))
        plateau = None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        if plateau is not None and state.get("plateau"):
            plateau.load_state_dict(state["plateau"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], device.type)
        say(f"resumed {run_dir} at epoch {progress.epoch + 1}, step {progress.step_in_epoch} of {steps_per_epoch}")
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if state is None:
            meta = {"config": cfg, "fastblock": __version__, "torch": torch.__version__,
                    "python": platform.python_version(),
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
                    platform.processor() or "cpu",
                    "backend": backend_name, "world_size": dist.world, "parameters": n_params,
                    "flops_per_image": flops, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            (run_dir / "config.json").write_text(json.dumps(meta, indent=2))
        say(f"run directory: {run_dir}")

    pool_scope = cpu_pool_for(cfg, device, backend_name, say)
    ctx = dict(cfg=cfg, args=args, dist=dist, device=device, say=say, model=model, train_model=train_model,
               pool_scope=pool_scope,
               ema=ema, opt=opt, scheduler=scheduler, plateau=plateau, scaler=scaler, amp_dtype=amp_dtype,
               channels_last=channels_last, plan=plan, progress=progress, run_dir=run_dir, mean=mean, std=std,
               train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, local_batch=local_batch,
               classes=data.classes, backend=backend_name, flips=flip_parity(len(train_y), cfg["seed"], device),
               choices=dict(device_type=device.type, amp=AMP_NAMES[amp_dtype], channels_last=channels_last))
    interrupted = _train(ctx)
    if interrupted:
        return 130
    rows = progress.rows
    say(f"done: final accuracy {100 * rows[-1]['test_acc']:.2f}%, best {100 * progress.best_acc:.2f}%, "
        f"{progress.train_seconds:.1f}s of training; results in {run_dir}")
    if dist.world > 1:
        torch.distributed.destroy_process_group()
    return 0


def pick_backend(requested: str, device, dtype, say) -> str:
    try:
        from .. import extension

        if device.type in ("cpu", "cuda") and requested in ("auto", "extension", "cuda") and extension.build_needed():
            say("building the C++ extension (first use only; about a minute)...", flush=True)
        backend_name = resolve_backend(requested, device, dtype=dtype)
    except RuntimeError as exc:
        raise BackendUnavailable(str(exc)) from None
    report = available_backends(device)
    say(f"backend: {backend_name} (requested {requested}; {report[backend_name].reason})")
    for name, st in report.items():
        if name != backend_name:
            say(f"  {name}: {st}")
    return backend_name


def cpu_pool_for(cfg, device, backend_name: str, say):
    """On CPU with the extension: its allocation pool switched on, and the scope the training steps and evaluations
    run in (glibc maps multi-MB buffers afresh on every allocation, so each step page-faults its whole working set
    in again: bench/RESULTS.md). Elsewhere a no-op scope."""
    if device.type != "cpu" or backend_name != "extension" or not cfg["cpu_pool_gib"]:
        return contextlib.nullcontext
    from .. import extension

    try:
        extension.set_cpu_pool_limit(int(cfg["cpu_pool_gib"] * 2**30))
    except RuntimeError as exc:  # another CPU allocator with a higher priority is installed
        say(f"memory: the extension's CPU allocation pool stays off ({str(exc).splitlines()[0]})")
        return contextlib.nullcontext
    say(f"memory: the extension's CPU allocation pool keeps up to {cfg['cpu_pool_gib']:g} GiB of freed buffers "
        "for the next step (--cpu-pool-gib 0: off)")
    return extension.cpu_pool_scope


def _train(ctx) -> bool:
    """Train from where ctx's progress stands to the end of the plan (or --stop-after). Returns True when
    interrupted (Ctrl-C / SIGTERM), after saving a resumable checkpoint."""
    from tqdm.auto import tqdm

    cfg, args, dist, device, say = ctx["cfg"], ctx["args"], ctx["dist"], ctx["device"], ctx["say"]
    plan, progress = ctx["plan"], ctx["progress"]
    global_batch, local_batch = cfg["batch_size"], ctx["local_batch"]
    micro = max(1, local_batch // cfg["accum_steps"])
    train_x, train_y = ctx["train_x"], ctx["train_y"]
    checkpoint_every = 60.0 * args.checkpoint_minutes if args.checkpoint_minutes else float("inf")
    last_save = time.perf_counter()
    probe: list[float] = []
    # --time-budget: the epoch-end re-plans fit the steps to the time left at the last epoch's pace; within the
    # epoch where the time runs out the steps are re-fitted as they go (the decay then ends at the budget), and a
    # step that would end past the budget is not started.
    budget_s = args.time_budget * 60 if args.time_budget and not args.resume else None
    recent_steps: collections.deque = collections.deque(maxlen=5)  # seconds of the last steps, per full-size step
    epoch_paces: list[float] = []  # seconds of this epoch's steps, per full-size step
    last_setup = None  # what the previous step trained: its frozen parameters and image size
    stop_epoch = math.ceil(plan.total_steps / plan.steps_per_epoch)
    if args.stop_after:
        stop_epoch = min(stop_epoch, args.stop_after)

    previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt) if _on_main_thread() else None
    bar = None
    try:
        while progress.epoch < stop_epoch:
            epoch = progress.epoch
            gen = epoch_generator(cfg["seed"], epoch, 0, device)
            perm = torch.randperm(len(train_y), device=device, generator=gen)
            if progress.gen_state is not None:  # resuming mid-epoch
                gen.set_state(progress.gen_state)
            epoch_flips = ctx["flips"] ^ bool(epoch % 2)
            ctx["frozen"] = _frozen_params(ctx, epoch)
            loss_sum, correct, seen, epoch_time = progress.epoch_sums
            last_step = min(plan.steps_per_epoch, plan.total_steps - epoch * plan.steps_per_epoch)
            ctx["train_model"].train()
            # a budget run may re-fit its final epoch up to the epoch's end (the loop stops where the plan does)
            first_step = progress.step_in_epoch
            bar = tqdm(range(first_step, plan.steps_per_epoch if budget_s else last_step), desc=f"epoch {epoch + 1}",
                       leave=False, total=last_step - first_step, disable=not dist.main or args.no_progress,
                       unit="step", mininterval=progress_interval())
            refitted = False
            epoch_paces.clear()
            for step in bar:
                global_step = epoch * plan.steps_per_epoch + step
                cost = step_cost(cfg, plan, global_step, global_step + 1)  # in full-size steps (--small-crop)
                if budget_s is not None and recent_steps:
                    pace, spent = statistics.median(recent_steps) * cost, progress.train_seconds
                    # (rank means of the slowest recent step and of the time spent: every rank re-fits alike)
                    over, slowest, spent = dist.all_sum([float(spent + pace > budget_s), max(recent_steps) / dist.world,
                                                         spent / dist.world], device)
                    if over:  # (when any rank would run past it: all ranks stop at the same step)
                        _stop_at_budget(ctx, global_step)
                        break
                    if _refit_final_epoch(ctx, epoch, global_step, slowest, spent, announce=not refitted):
                        refitted = True
                        bar.total = plan.total_steps - epoch * plan.steps_per_epoch - first_step
                        bar.refresh()
                t0 = time.perf_counter()
                batch = perm[step * global_batch:(step + 1) * global_batch]
                batch = batch[dist.rank * local_batch:(dist.rank + 1) * local_batch]
                loss_step, correct_step = _train_step(ctx, batch, epoch_flips[batch], gen, micro, global_step)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                loss_sum, correct, seen = loss_sum + loss_step * len(batch), correct + correct_step, seen + len(batch)
                epoch_time += dt
                progress.train_seconds += dt
                progress.steps.append(dict(step=global_step + 1, epoch=round(global_step / plan.steps_per_epoch + 1 /
                                                                                plan.steps_per_epoch, 4),
                                           lr=ctx["opt"].param_groups[0]["lr"], loss=round(loss_step, 5),
                                           train_seconds=round(progress.train_seconds, 3)))
                # A warm-up step is not the pace (its time counts as spent): the run's first (builds, the first
                # compile), and the first after the trainable parameters or the image size change (torch.compile
                # recompiles then).
                setup = (tuple(id(p) for p in ctx["frozen"]), cost)
                if len(progress.steps) > 1 and setup == last_setup:
                    recent_steps.append(dt / cost)
                    epoch_paces.append(dt / cost)
                last_setup = setup
                if ctx["scheduler"] is not None:
                    ctx["scheduler"].step()
                _maybe_update_ema(ctx, global_step)
                progress.step_in_epoch = step + 1
                progress.epoch_sums = (loss_sum, correct, seen, epoch_time)
                progress.gen_state = gen.get_state()
                _probe(ctx, probe, dt, global_step)
                if dist.main and not args.no_progress:
                    bar.set_postfix(loss=f"{loss_sum / max(1, seen):.3f}", acc=f"{100 * correct / max(1, seen):.1f}",
                                    img_s=f"{seen * dist.world / max(epoch_time, 1e-9):.0f}")
                if time.perf_counter() - last_save > checkpoint_every and step + 1 < last_step:
                    _save(ctx, best=False)
                    last_save = time.perf_counter()
                if global_step + 1 >= plan.total_steps:  # a --time-budget run re-planned mid-epoch (probe, re-fit)
                    break
            bar.close()
            last_step = progress.step_in_epoch
            if last_step == 0:  # the budget ran out at an epoch's first step: nothing of it to report
                break
            _replan_to_budget(ctx, epoch, last_step, epoch_paces)
            stop_epoch = math.ceil(plan.total_steps / plan.steps_per_epoch)
            if args.stop_after:
                stop_epoch = min(stop_epoch, args.stop_after)
            _end_epoch(ctx, last_step)
            last_save = time.perf_counter()
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        if dist.main:
            _save(ctx, best=False)
        say(f"\ninterrupted in epoch {progress.epoch + 1} after step {progress.step_in_epoch}; saved. Continue with: "
            f"python -m fastblock.train --resume {ctx['run_dir']}")
        return True
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
    return False


def _frozen_params(ctx, epoch: int) -> list:
    """Parameters that do not train this epoch (the patch-whitening bias after --whiten-bias-epochs); their gradient
    is dropped before each optimizer step, which then leaves them alone (no update, no momentum, no weight decay).
    In one process they also stop requiring a gradient, which spares its computation; under
    DistributedDataParallel they keep requiring it (it expects the same parameters to get gradients every step)."""
    limit, whiten = ctx["cfg"]["whiten_bias_epochs"], getattr(ctx["model"], "whiten", None)
    if limit is None or not isinstance(getattr(whiten, "bias", None), nn.Parameter):
        return []
    frozen = epoch >= limit
    if ctx["dist"].world == 1:
        whiten.bias.requires_grad_(not frozen)
    return [whiten.bias] if frozen else []


def _replan_to_budget(ctx, epoch: int, steps_in_epoch: int, epoch_paces: list[float]) -> None:
    """--time-budget: after each epoch the steps still to run are fitted again to the time left, at the pace of the
    epoch just trained (its steps' mean seconds per full-size step, warm-up steps left out), so a run on a machine
    whose speed drifts still ends within its budget (the learning rate goes on from its current value through the
    rest of its schedule, spread over the new number of steps)."""
    args, plan, progress = ctx["args"], ctx["plan"], ctx["progress"]
    done = epoch * plan.steps_per_epoch + steps_in_epoch
    if not args.time_budget or args.resume or not epoch_paces or done >= plan.total_steps:
        return
    pace, spent = _rank_mean(ctx, [statistics.fmean(epoch_paces), progress.train_seconds])
    left = _time_left(ctx, spent)
    total = done + steps_within(ctx["cfg"], plan, done, left / pace)
    if abs(total - plan.total_steps) > 0.01 * plan.total_steps:
        ctx["say"](f"time budget: {left / 60:.1f} min left at {pace:.2f} s/step{_full_size(ctx)}: {total - done} "
                   f"more steps (planned: {plan.total_steps - done})")
        _replan(ctx, total, done)


def _refit_final_epoch(ctx, epoch: int, done: int, slowest: float, spent: float, announce: bool) -> bool:
    """--time-budget, before each step of the epoch in which the time runs out (as planned, or at the recent pace):
    the steps left are fitted to the time left at ``slowest``, the slowest of the last few steps (a step slower than
    the planned pace would otherwise leave no time for the plan's last step), up to the epoch's end, so that the
    learning-rate decay finishes at the budget instead of being cut off when the machine slows down, or ending
    early when it speeds up. Returns whether it re-planned."""
    plan = ctx["plan"]
    epoch_end = (epoch + 1) * plan.steps_per_epoch
    fit = done + steps_within(ctx["cfg"], plan, done, _time_left(ctx, spent) / slowest)
    if fit <= done or (plan.total_steps > epoch_end and fit >= epoch_end):
        return False  # no step fits (the budget check stops the run), or the time does not run out this epoch
    total = min(fit, epoch_end)
    if total == plan.total_steps:
        return False
    if announce:
        ctx["say"](f"time budget: in the final epoch the steps are re-fitted to the time left as they go, at the "
                   f"slowest recent step ({slowest:.2f} s{_full_size(ctx)}): now {total - done} more steps "
                   f"(planned: {plan.total_steps - done})")
    _replan(ctx, total, done)
    return True


def _full_size(ctx) -> str:
    """Where --small-crop steps are planned: the time budget's step times are those of a full-size step."""
    return " per full-size step" if small_crop_steps(ctx["cfg"], ctx["plan"]) else ""


def _time_left(ctx, spent: float) -> float:
    """Seconds of the --time-budget left after ``spent`` seconds of training (0 once it is used up)."""
    return max(0.0, ctx["args"].time_budget * 60 - spent)


def _rank_mean(ctx, values: list[float]) -> list[float]:
    """The mean over ranks of each value: every rank then plans the same steps from its own timings."""
    world = ctx["dist"].world
    return [v / world for v in ctx["dist"].all_sum(values, ctx["device"])]


def _stop_at_budget(ctx, steps_done: int) -> None:
    """--time-budget: the next step would end past the budget; the run ends after steps_done steps."""
    cut = ctx["plan"].total_steps - steps_done
    ctx["say"](f"time budget: {ctx['progress'].train_seconds / 60:.2f} of {ctx['args'].time_budget:g} min used; "
               f"stopping {cut} step{'s' if cut != 1 else ''} before the plan's end")
    _replan(ctx, steps_done, steps_done)


def _replan(ctx, total: int, steps_done: int) -> None:
    """A --time-budget re-plan: the run's length in steps (the schedule goes on from where it stands, Plan.replan),
    and the epochs config.json records for it."""
    ctx["plan"].replan(total, steps_done)
    ctx["cfg"]["epochs"] = round(total / ctx["plan"].steps_per_epoch, 3)


def _on_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _train_step(ctx, batch, flips, gen, micro, global_step: int) -> tuple[float, float]:
    cfg, model, opt, scaler = ctx["cfg"], ctx["train_model"], ctx["opt"], ctx["scaler"]
    device, amp_dtype = ctx["device"], ctx["amp_dtype"]
    x_all = augment(cfg, ctx["train_x"][batch].float().div_(255), gen, flips,
                    small_crop=global_step < small_crop_steps(cfg, ctx["plan"]))
    x_all = (x_all - ctx["mean"]) / ctx["std"]
    y_all = ctx["train_y"][batch]
    opt.zero_grad(set_to_none=True)
    loss_sum = correct = 0.0
    with ctx["pool_scope"]():
        for m0 in range(0, len(batch), micro):
            x, y = x_all[m0:m0 + micro], y_all[m0:m0 + micro]
            if ctx["channels_last"]:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg["label_smoothing"])
            scaler.scale(loss * len(x) / len(batch)).backward()
            loss_sum += loss.item() * len(x)
            correct += (logits.argmax(1) == y).sum().item()
        for p in ctx.get("frozen", ()):
            p.grad = None
        scaler.step(opt)
        scaler.update()
    return loss_sum / len(batch), correct


def _maybe_update_ema(ctx, global_step: int) -> None:
    if ctx["ema"] is not None and (global_step + 1) % ctx["cfg"]["ema_every"] == 0:
        _update_average(ctx, global_step + 1)


def _update_average(ctx, steps_done: int) -> None:
    if ctx["cfg"]["lookahead"]:
        lookahead_update(ctx["ema"], ctx["model"], lookahead_decay(ctx["cfg"], ctx["plan"], steps_done))
    else:
        ctx["ema"].update_parameters(ctx["model"])


def _probe(ctx, probe: list, dt: float, global_step: int) -> None:
    """After the first steps: the projected training time, and the plan of a --time-budget run."""
    args, plan, progress, say = ctx["args"], ctx["plan"], ctx["progress"], ctx["say"]
    if len(probe) > PROBE_STEPS or len(progress.steps) <= 1:  # the first step (warm-up, builds) is not timed
        return
    probe.append(dt)
    if len(probe) < PROBE_STEPS:
        return
    cfg = ctx["cfg"]
    # per full-size step (the probe's steps may be --small-crop ones)
    per_step = sorted(probe)[len(probe) // 2] / step_cost(cfg, plan, global_step, global_step + 1)
    probe.append(float("nan"))  # done
    if args.time_budget and global_step < plan.total_steps and not args.resume:
        # the time already spent counts: a first step that compiled the model for a minute is part of the budget
        per_step, spent = _rank_mean(ctx, [per_step, progress.train_seconds])
        _replan(ctx, global_step + 1 + steps_within(cfg, plan, global_step + 1, _time_left(ctx, spent) / per_step),
                global_step + 1)
        say(f"time budget {args.time_budget:g} min at {per_step:.2f} s/step{_full_size(ctx)}: {plan.total_steps} "
            f"steps ({cfg['epochs']:g} epochs); the schedule spans them")
    remaining = step_cost(cfg, plan, global_step + 1, plan.total_steps) * per_step
    say(f"projected training time: {(progress.train_seconds + remaining) / 60:.1f} min for {plan.total_steps} steps "
        f"({per_step:.2f} s/step{_full_size(ctx)} over the first steps; evaluation not included)")


def _end_epoch(ctx, last_step: int) -> None:
    cfg, dist, device, say, plan, progress = (ctx[k] for k in ("cfg", "dist", "device", "say", "plan", "progress"))
    loss_sum, correct, seen, epoch_time = progress.epoch_sums
    seen_all, loss_all, correct_all = dist.all_sum([seen, loss_sum, correct], device)
    ema = ctx["ema"]
    if ema is not None:
        _update_average(ctx, progress.epoch * plan.steps_per_epoch + last_step)
    common = (ctx["test_x"], ctx["test_y"], ctx["mean"], ctx["std"], 1024, ctx["amp_dtype"], ctx["channels_last"])
    with ctx["pool_scope"]():
        test_loss, test_acc, _, raw_acc = evaluate(ema.module if ema is not None else ctx["model"], *common,
                                                   cfg["tta"], dist, device)
        if ema is not None:  # the raw weights, one view (without averaged weights: the TTA pass's plain view)
            raw_acc = evaluate(ctx["model"], *common, False, dist, device).acc
    if ctx["plateau"] is not None:
        ctx["plateau"].step(test_loss)
    epoch_value = progress.epoch + last_step / plan.steps_per_epoch
    row = dict(epoch=round(epoch_value, 4), lr=ctx["opt"].param_groups[0]["lr"], train_loss=loss_all / seen_all,
               train_acc=correct_all / seen_all, test_loss=test_loss, test_acc=test_acc, raw_test_acc=raw_acc,
               seconds=round(epoch_time, 3), images_per_s=round(seen_all / max(epoch_time, 1e-9), 1))
    is_best = test_acc > progress.best_acc
    # everything about the finished epoch changes here at once: an interrupt before leaves it to be redone
    progress.rows.append(row)
    for target in (0.80, 0.85, 0.90, 0.91, 0.93, 0.94):
        if test_acc >= target and str(target) not in progress.milestones:
            progress.milestones[str(target)] = round(progress.train_seconds, 2)
    progress.best_acc = max(progress.best_acc, test_acc)
    progress.epoch += 1
    progress.step_in_epoch = 0
    progress.epoch_sums = (0.0, 0.0, 0.0, 0.0)
    progress.gen_state = None
    say(f"epoch {epoch_value:6.2f}/{cfg['epochs']:g}  lr {row['lr']:.4g}  train loss {row['train_loss']:.4f} "
        f"acc {100 * row['train_acc']:.2f}%  |  {'val' if cfg['val_split'] else 'test'} loss {test_loss:.4f} "
        f"acc {100 * test_acc:.2f}%" + (f" (raw weights, no TTA: {100 * raw_acc:.2f}%)" if raw_acc != test_acc
                                        else "") +
        f"  |  {epoch_time:.1f}s  {row['images_per_s']:.0f} img/s")
    if dist.main:
        _save(ctx, best=is_best)


def _save(ctx, best: bool) -> None:
    cfg, progress, run_dir = ctx["cfg"], ctx["progress"], ctx["run_dir"]
    ema, plateau = ctx["ema"], ctx["plateau"]
    eval_model = ema.module if ema is not None else ctx["model"]
    ckpt = {"model": ctx["model"].state_dict(), "optimizer": ctx["opt"].state_dict(),
            "scheduler": ctx["scheduler"].state_dict() if ctx["scheduler"] is not None else None,
            "ema": ema.state_dict() if ema is not None else None,
            "plateau": plateau.state_dict() if plateau is not None else None, "scaler": ctx["scaler"].state_dict(),
            "rng": rng_state(ctx["device"].type), "progress": dataclasses.asdict(progress),
            "plan": dataclasses.asdict(ctx["plan"]), "config": cfg, "choices": ctx["choices"]}
    atomic_torch_save(ckpt, run_dir / "last.pt")
    if best:
        atomic_torch_save({"model": eval_model.state_dict(), "config": cfg, "epoch": progress.epoch,
                           "test_acc": progress.best_acc, "classes": ctx["classes"]}, run_dir / "best.pt")
    write_steps(progress.steps, run_dir / "steps.csv")
    if progress.rows:
        write_metrics(progress.rows, run_dir / "metrics.csv")
        plot_curves(progress.rows, progress.steps, run_dir / "curves.png")
        last = progress.rows[-1]
        summary = {"final_test_acc": last["test_acc"], "final_raw_test_acc": last["raw_test_acc"],
                   "best_test_acc": progress.best_acc, "epochs": last["epoch"],
                   "train_seconds": round(progress.train_seconds, 2), "time_to_accuracy_s": progress.milestones,
                   "backend": ctx["backend"], "device": str(ctx["device"])}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))


def eval_only(args, device, dist, say) -> int:
    refuse_ignored_options(args, EVAL_ONLY_OPTIONS, "--eval-only evaluates a checkpoint with the settings it was "
                           "trained with", "--tta, --subset, --data-dir, --backend and --device may change")
    path = Path(args.eval_only)
    if path.is_dir():  # a run directory: its best checkpoint
        path = path / "best.pt"
    ckpt = load_checkpoint(path, "--eval-only")
    cfg = dict(ckpt["config"])
    if "data_dir" in args.given or "data_dir" not in cfg:
        cfg["data_dir"] = args.data_dir
    cfg["val_split"], cfg["subset"] = cfg.get("val_split", 0.0), args.subset or cfg.get("subset", 0)
    amp_dtype = amp_dtype_for(cfg, device)
    backend_name = pick_backend(args.backend, device, amp_dtype or torch.float32, say)
    model = build_model(cfg["model"], backend=backend_name).to(device)
    state = ckpt["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise RunError(f"--eval-only: {path} does not fit model {cfg['model']!r}: {str(exc).splitlines()[0]}") from None
    channels_last = channels_last_for(cfg, device, model)  # as the run set it ("auto": this machine's choice)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    data = load_data(cfg, args, dist)
    mean, std = (t.to(device).view(1, 3, 1, 1) for t in data.mean_std)
    tta = cfg.get("tta", False) if args.tta is None else args.tta
    cfg.setdefault("cpu_pool_gib", recipe_defaults()["cpu_pool_gib"])  # runs from before the setting existed
    with cpu_pool_for(cfg, device, backend_name, say)():  # as the run's own evaluations: no page-faulting buffers
        loss, acc, preds, plain_acc = evaluate(model, data.test_x.to(device), data.test_y.to(device), mean, std,
                                               1024, amp_dtype, channels_last, tta, dist, device)
    say(f"{path}: {'validation' if cfg['val_split'] else 'test'} accuracy {100 * acc:.2f}%  loss {loss:.4f}"
        f"  ({len(data.test_y)} images, TTA {tta or 'off'}" + (f"; without TTA {100 * plain_acc:.2f}%)" if tta
                                                               else ")"))
    if dist.world == 1:
        say(confusion_report(preds, data.test_y.to(device), data.classes))
    return 0


__all__ = ["BackendUnavailable", "DataError", "RunError", "amp_dtype_for", "augment", "channels_last_for",
           "Evaluation", "evaluate", "lr_factor", "make_ema", "make_optimizer", "param_groups", "run"]
