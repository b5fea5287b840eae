"""Training recipes: one dataclass of every setting, and the named presets built from it."""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch

from ..models import MODELS


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Every trainer setting; each has a command-line flag of the same name that overrides the preset's value."""

    description: str = ""
    model: str = "air-cpu"
    epochs: float = 10             # may be fractional: the last epoch is then partial
    batch_size: int = 512
    optimizer: str = "sgd"         # sgd | muon (Muon: the Blocks' filters; SGD: the rest) | adam | adamw | rmsprop
    lr: float = 0.2
    momentum: float = 0.9
    muon_lr: float = 0.24          # optimizer muon: the filters' lr (the angle a step turns them by; schedule as lr)
    muon_momentum: float = 0.6
    nesterov: bool = True
    weight_decay: float = 5e-4     # not applied to BatchNorm parameters and biases (but see bn_bias_lr_scale)
    bn_bias_lr_scale: float = 1.0  # BatchNorm biases: lr x this, weight decay / this (the weights' decay per step)
    bn_momentum: Optional[float] = None  # BatchNorm running-statistics momentum (None: the model's own, 0.1)
    label_smoothing: float = 0.2
    schedule: str = "linear"       # linear | cosine | constant | plateau, after a linear warm-up
    warmup_epochs: float = 1.0
    warmup_fraction: float = 0.0   # warm-up as a fraction of the run's steps instead of warmup_epochs (0: off)
    warmup_start: float = 0.0      # lr factor at the first step; the warm-up rises linearly from it to 1
    min_lr_ratio: float = 0.0
    t_max: Optional[float] = None  # cosine period in epochs (default: the run length)
    crop_pad: int = 4              # random translation by up to this many pixels (0: off)
    small_crop: int = 0            # train the first small_crop_epochs on random SxS windows of the images (not
    small_crop_epochs: float = 0.0 # rescaled): cheaper early steps; 0: full-size images throughout
    flip: Union[bool, str] = True  # random horizontal flips; "alternate": each image flipped every other epoch
    cutout: int = 0
    resized_crop: bool = False
    rotate: float = 0.0
    freeze_bn_weight: bool = False  # keep BatchNorm scales at 1 (train only their biases)
    whiten_bias_epochs: Optional[float] = None  # patch-whitening models: its bias trains this many epochs, then
                                                # stays fixed (None: the whole run)
    dirac: bool = False            # identity-initialised convolutions where the model offers it (dirac_init_)
    ema: float = 0.99              # decay of the averaged weights used for evaluation (0: off)
    ema_every: int = 5             # steps between EMA updates
    ema_warmup: bool = True        # decay ramps up as min(ema, (1 + n) / (10 + n)) over the first n updates
    lookahead: bool = False        # the model continues from the average at each update; decay ema x (t/T)^3
    accum_steps: int = 1
    amp: str = "auto"              # auto | bf16 | fp16 | off
    channels_last: Union[bool, str] = "auto"
    tta: Union[bool, str] = True   # True: flips; "flip-translate": + 1-pixel shifts (6 views); "...-all": 18 views
    compile: bool = False
    cpu_pool_gib: float = 4.0      # CPU + extension: the allocation pool's cache for training steps (0: off)


def _recipe(description: str, **settings) -> Recipe:
    return Recipe(description=description, **settings)


# The speed-run recipe of the cpu preset (the fast preset runs it, network included, on a GPU). Its
# hyperparameters follow the public airbench speed-run with Muon at its batch of 2000, converted from a summed to a
# mean loss: Muon for the Blocks' filters (lr 0.24, momentum 0.6); SGD-Nesterov for the rest at lr 8.28e-4 per
# image (the public head lr under this network's 1/9 logit scale), the BatchNorm biases at 64x, a weight decay of
# 2e-6 per image per step; no warm-up, a linear decay to 0, no weight averaging (bench/RESULTS.md has the runs
# behind it, and the SGD recipe with lookahead that it replaced). channels_last "auto" makes its K=1 network
# channels-last in every precision.
SPEED_RUN = dict(
    model="air-cpu-wide-k1-poolfirst-gelu", whiten_bias_epochs=3, epochs=12, batch_size=2000, optimizer="muon",
    lr=1.656, momentum=0.85, weight_decay=2.415e-3, muon_lr=0.24, muon_momentum=0.6, bn_bias_lr_scale=64.0,
    bn_momentum=0.4, warmup_epochs=0.0, min_lr_ratio=0.0, crop_pad=2, flip="alternate", freeze_bn_weight=True,
    dirac=True, ema=0.0, tta="flip-translate")

PRESETS: dict[str, Recipe] = {
    "cpu": _recipe(
        "default without a GPU: " + MODELS["air-cpu-wide-k1-poolfirst-gelu"].description + " (K=1: gated Blocks "
        "did not pay for their cost on a CPU, bench/RESULTS.md; identity-initialised; the whitening bias trains for "
        "3 epochs); batch 2000, Muon for the Blocks' filters (lr 0.24, momentum 0.6), SGD-Nesterov lr 1.656 "
        "momentum 0.85 for the rest, BatchNorm biases at 64x the lr, linear decay to 0 without warm-up, label "
        "smoothing 0.2, frozen BatchNorm scales, alternating flips + 2-pixel translations, flip-and-translate TTA; "
        "channels_last, bf16 autocast on CPUs with bf16 matrix instructions (float32 elsewhere); 12 epochs",
        **SPEED_RUN),
    "fast": _recipe(
        "default on a GPU: the cpu recipe and network on a GPU -- " +
        MODELS["air-cpu-wide-k1-poolfirst-gelu"].description + " -- with torch.compile, bf16 autocast and "
        "channels_last, the same batch 2000 and optimizers, 16 epochs (its pooling and GELU GPU kernels are "
        "covered by backend='auto''s runtime self-check)",
        **dict(SPEED_RUN, epochs=16, compile=True)),
    "resnet9": _recipe(
        "a gated-Block ResNet-9: " + MODELS["resnet9-gated"].description + "; batch 512, SGD-Nesterov, warm-up + "
        "linear decay, label smoothing 0.2, EMA, flip TTA, crop+flip, bf16 + channels_last on GPUs",
        model="resnet9-gated"),
    "tiny": _recipe(
        "smoke-test recipe: " + MODELS["tiny"].description + "; the default training settings with batch 64 "
        "and no EMA", model="tiny", epochs=3, batch_size=64, lr=0.05, ema=0.0, warmup_epochs=0.0),
    "coursework-a": _recipe(
        "config A (reported 86.85%, 12 min): " + MODELS["coursework-a"].description + "; RMSprop lr 1.5e-3, "
        "cosine, batch 128, 40 epochs, no augmentation",
        model="coursework-a", epochs=40, batch_size=128, optimizer="rmsprop", lr=1.5e-3, momentum=0.0,
        nesterov=False, weight_decay=0.0, label_smoothing=0.0, schedule="cosine", warmup_epochs=0.0, crop_pad=0,
        flip=False, ema=0.0, tta=False),
    "coursework-b": _recipe(
        "config B (reported 89.66%): " + MODELS["coursework-b"].description + "; label smoothing, RMSprop lr 1e-3 "
        "momentum 0.9, cosine (T_max 100, eta_min 1e-6), batch 64, 40 epochs, random-resized-crop + rotation 15 "
        "+ flip",
        model="coursework-b", epochs=40, batch_size=64, optimizer="rmsprop", lr=1e-3, momentum=0.9, nesterov=False,
        weight_decay=0.0, label_smoothing=0.1, schedule="cosine", t_max=100, min_lr_ratio=1e-3, warmup_epochs=0.0,
        crop_pad=0, resized_crop=True, rotate=15.0, ema=0.0, tta=False),
    "coursework-c": _recipe(
        "config C (reported 86.35%): " + MODELS["coursework-c"].description + "; Adam lr 2e-3 wd 1e-5, batch 64, "
        "60 epochs",
        model="coursework-c", epochs=60, batch_size=64, optimizer="adam", lr=2e-3, weight_decay=1e-5,
        label_smoothing=0.0, schedule="constant", warmup_epochs=0.0, crop_pad=0, flip=False, ema=0.0, tta=False),
    "coursework-d": _recipe(
        "config D (reported 89.6%): " + MODELS["coursework-d"].description + "; Adam lr 1e-3 wd 1e-4, cosine with "
        "5 warm-up epochs of 50, batch 128, crop(pad 4) + flip",
        model="coursework-d", epochs=50, batch_size=128, optimizer="adam", lr=1e-3, weight_decay=1e-4,
        label_smoothing=0.0, schedule="cosine", warmup_epochs=5.0, ema=0.0, tta=False),
    "resnet32": _recipe(
        "config E (reported 86.77%): " + MODELS["resnet32"].description + "; SGD lr 0.1 momentum 0.9 wd 1e-4, "
        "reduce-on-plateau, batch 128, 50 epochs, flip + random-resized-crop",
        model="resnet32", epochs=50, batch_size=128, optimizer="sgd", lr=0.1, momentum=0.9, nesterov=False,
        weight_decay=1e-4, label_smoothing=0.0, schedule="plateau", warmup_epochs=0.0, crop_pad=0,
        resized_crop=True, ema=0.0, tta=False),
}

SETTINGS = tuple(f.name for f in dataclasses.fields(Recipe) if f.name != "description")


def recipe_defaults() -> dict:
    """Every setting's default value (what a run recorded before a setting existed is read with)."""
    return {k: v for k, v in dataclasses.asdict(Recipe()).items() if k != "description"}


def resolve_preset(name: str) -> dict:
    """The preset's settings as a plain dict (what config.json records)."""
    if name not in PRESETS:
        raise SystemExit(f"unknown preset {name!r}; --list-presets shows {sorted(PRESETS)}")
    return {k: v for k, v in dataclasses.asdict(PRESETS[name]).items() if k != "description"}


def default_preset(device: torch.device) -> tuple[str, str]:
    """(preset, why) when --preset is not given: the GPU recipe on CUDA, the CPU recipe elsewhere."""
    if device.type == "cuda":
        return "fast", f"a GPU ({torch.cuda.get_device_name(device)}) is in use"
    return "cpu", "no GPU is in use, and the GPU recipe's network is several times slower on a CPU"
