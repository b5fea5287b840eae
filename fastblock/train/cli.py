"""The command line: ``python -m fastblock.train`` (see ``--help``)."""
from __future__ import annotations

import argparse
import math
import sys


from ..backends import accepted_names, device_from_text
from ..data import DataError
from ..models import MODELS
from .loop import TTA_MODES, BackendUnavailable, RunError, run
from .presets import PRESETS

USAGE = """Train CIFAR-10 networks of fastblock Blocks.

    python -m fastblock.train                                  # the default recipe for this machine
    python -m fastblock.train --data-dir PATH --backend triton
    python -m fastblock.train --list-presets
    python -m fastblock.train --resume runs/cpu-20261130-120000
    python -m fastblock.train --eval-only runs/cpu-20261130-120000 --tta
    torchrun --nproc_per_node 2 -m fastblock.train ...          (DistributedDataParallel)

Without --preset the trainer takes "fast" on a GPU and "cpu" elsewhere, and says so on its first line; any flag
overrides the preset. A run directory holds config.json, metrics.csv (per epoch, test accuracy of the averaged and
of the raw weights), steps.csv (loss and learning rate per step), last.pt / best.pt (atomic, weights_only-loadable),
curves.png and summary.json. Ctrl-C saves a resumable checkpoint.
"""


def _choice(mapping: dict):
    """An argparse type for a word from ``mapping``: its value, or argparse's one-line error naming the choices."""
    def parse(value: str):
        if value not in mapping:
            raise argparse.ArgumentTypeError(f"invalid choice {value!r} (choose from {', '.join(mapping)})")
        return mapping[value]
    return parse


def number_arg(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type for a number (``kind``: int or float) from ``low`` up to ``high`` (None: no upper end);
    low_open / high_open exclude that end. Out-of-range values get argparse's one-line error with the range."""
    if low is not None and high is not None:
        limits = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    else:
        limits = f"{'>' if low_open else '>='} {low:g}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if below or above or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be {limits}, got {text}")
        return value
    return parse


def _device(text: str):
    try:
        return device_from_text(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_count = number_arg(int, 1)                           # batch sizes, steps
_nonnegative_int = number_arg(int, 0)                 # pixels, image counts (0: off)
_nonnegative = number_arg(float, 0)                   # learning rates, decays, epochs of a phase, GiB, minutes
_positive = number_arg(float, 0, low_open=True)       # lengths
_fraction = number_arg(float, 0, 1)                   # ratios, smoothing
_below_one = number_arg(float, 0, 1, high_open=True)  # momenta, averaging decays, held-out shares

_flip = _choice({"on": True, "off": False, "alternate": "alternate"})
_TTA_CHOICES = {"on": True, "off": False, **{mode: mode for mode in TTA_MODES}}
_tta = _choice(_TTA_CHOICES)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastblock.train", description=USAGE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--preset", default=None, choices=sorted(PRESETS),
        help="recipe to start from (default: fast on a GPU, cpu otherwise); see --list-presets")
    add("--list-presets", action="store_true", help="list the presets and exit")
    add("--backend", default="auto", choices=accepted_names(),
        help="fastblock backend for every Block (default: auto; 'cuda' is an alias of 'extension')")
    add("--data-dir", default="data", help="cifar-10-batches-py folder, ImageFolder tree DIR/{train,test}/<class>, "
        "or a .tar.gz of one (default: ./data; CIFAR-10 is downloaded there when missing and online)")
    add("--cache-dir", default=None, help="where decoded image folders are cached (default: ~/.cache/fastblock)")
    add("--no-download", action="store_true", help="never try to download CIFAR-10")
    add("--val-split", type=_below_one, default=0.0, help="hold out this fraction of train for validation (default: 0)")
    add("--subset", type=_nonnegative_int, default=0,
        help="train on a class-balanced, seeded subset of N images (and N//5 test images): smoke runs")
    hp = p.add_argument_group("training (default: the preset's value)")
    hp.add_argument("--model", choices=sorted(MODELS), help="network")
    hp.add_argument("--epochs", type=_positive, help="epochs (may be fractional); with --resume: extend the run")
    hp.add_argument("--time-budget", type=_positive, metavar="MIN",
                    help="train for as many steps as fit in MIN minutes, timed over the first steps "
                         "(replaces --epochs; the schedule spans the planned steps)")
    hp.add_argument("--batch-size", type=_count, help="global batch size (split across ranks)")
    hp.add_argument("--accum-steps", type=_count, help="gradient accumulation steps per optimizer step")
    hp.add_argument("--lr", type=_nonnegative, help="peak learning rate")
    hp.add_argument("--optimizer", choices=["sgd", "muon", "adam", "adamw", "rmsprop"],
                    help="muon: Muon for the Blocks' convolution filters, SGD for every other parameter")
    hp.add_argument("--momentum", type=_below_one)
    hp.add_argument("--muon-lr", type=_nonnegative, help="--optimizer muon: the filters' peak learning rate")
    hp.add_argument("--muon-momentum", type=_below_one, help="--optimizer muon: the filters' momentum")
    hp.add_argument("--nesterov", action=argparse.BooleanOptionalAction)
    hp.add_argument("--weight-decay", type=_nonnegative, help="not applied to BatchNorm parameters and biases")
    hp.add_argument("--bn-bias-lr-scale", type=_positive,
                    help="BatchNorm biases train at this times the learning rate, with weight decay divided by it "
                         "(1: like the other biases, no decay)")
    hp.add_argument("--bn-momentum", type=_fraction, help="BatchNorm running-statistics momentum (as nn.BatchNorm2d)")
    hp.add_argument("--label-smoothing", type=_fraction)
    hp.add_argument("--schedule", choices=["linear", "cosine", "constant", "plateau"])
    hp.add_argument("--warmup-epochs", type=_nonnegative)
    hp.add_argument("--warmup-fraction", type=_fraction,
                    help="warm-up as a fraction of the run's steps (replaces --warmup-epochs; 0: off)")
    hp.add_argument("--warmup-start", type=_fraction, help="learning-rate factor at the first warm-up step (default 0)")
    hp.add_argument("--t-max", type=_positive, help="cosine period in epochs (default: the run length)")
    hp.add_argument("--min-lr-ratio", type=_fraction, help="final lr / peak lr for linear and cosine schedules")
    hp.add_argument("--crop-pad", type=_nonnegative_int, help="random translation by up to this many pixels (0: off)")
    hp.add_argument("--small-crop", type=_nonnegative_int, metavar="S",
                    help="train the first --small-crop-epochs on random SxS windows of the (translated) images, not "
                         "rescaled: cheaper early steps, full-size images after (0: off)")
    hp.add_argument("--small-crop-epochs", type=_nonnegative, metavar="E",
                    help="how long --small-crop lasts, in epochs")
    hp.add_argument("--flip", type=_flip, nargs="?", const=True, metavar="{on,off,alternate}",
                    help="horizontal flips: random (a bare --flip), none, or alternating (each image flipped every "
                         "other epoch)")
    hp.add_argument("--no-flip", dest="flip", action="store_const", const=False, help="same as --flip off")
    hp.add_argument("--cutout", type=_nonnegative_int, help="cutout square size (0: off)")
    hp.add_argument("--resized-crop", action=argparse.BooleanOptionalAction, help="random resized crop")
    hp.add_argument("--rotate", type=_nonnegative, help="random rotation range in degrees")
    hp.add_argument("--freeze-bn-weight", action=argparse.BooleanOptionalAction,
                    help="keep BatchNorm scales at 1 (only their biases train)")
    hp.add_argument("--whiten-bias-epochs", type=_nonnegative,
                    help="models with a patch-whitening layer (air-*): its bias trains for this many epochs, then "
                         "stays fixed (default: the whole run)")
    hp.add_argument("--dirac", action=argparse.BooleanOptionalAction,
                    help="identity-initialised convolutions (models with dirac_init_, e.g. the air-* networks)")
    hp.add_argument("--ema", type=_below_one, help="EMA decay of the weights used for evaluation (0: off)")
    hp.add_argument("--ema-every", type=_count, help="update the EMA every this many steps")
    hp.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction,
                    help="ramp the EMA decay up over the first updates (default: on)")
    hp.add_argument("--lookahead", action=argparse.BooleanOptionalAction,
                    help="lookahead: at every EMA update the model continues from the average, whose decay rises "
                         "as ema x (fraction of the run done)^3")
    hp.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"],
                    help="autocast (auto: bf16 on GPUs of compute capability 8.0+ and on CPUs with AMX/AVX512-BF16, "
                         "fp16 + GradScaler on older GPUs, else off)")
    hp.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                    help="channels-last activations and weights (default: on GPUs; on CPUs when training in bf16, "
                         "or in float32 when every Block is K=1)")
    hp.add_argument("--cpu-pool-gib", type=_nonnegative,
                    help="on CPU with the extension: GiB of freed buffers the extension's allocation pool may keep "
                         "for the next training step (0: off)")
    hp.add_argument("--tta", type=_tta, nargs="?", const=True, metavar="{" + ",".join(_TTA_CHOICES) + "}",
                    help="test-time augmentation: flips (a bare --tta), none, flips and 1-pixel translations (6 "
                         "views), or flips at all nine shifts of up to 1 pixel (18 views)")
    hp.add_argument("--no-tta", dest="tta", action="store_const", const=False, help="same as --tta off")
    hp.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model")
    run_group = p.add_argument_group("runs")
    run_group.add_argument("--out", default=None,
                           help="run directory, which must not hold a run yet (default: runs/<preset>-<timestamp>)")
    run_group.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt")
    run_group.add_argument("--eval-only", metavar="CHECKPOINT",
                           help="evaluate a checkpoint (or a run directory's best.pt) and print per-class results")
    run_group.add_argument("--stop-after", type=_count, metavar="EPOCHS",
                           help="stop after this many epochs (the schedule still spans --epochs); continue with "
                                "--resume")
    run_group.add_argument("--checkpoint-minutes", type=_nonnegative, default=10.0,
                           help="also save last.pt this often within an epoch (default: 10; 0: only per epoch)")
    run_group.add_argument("--seed", type=int, default=0)
    run_group.add_argument("--device", type=_device, default=None, help="cuda or cpu (default: cuda when available)")
    run_group.add_argument("--sync-bn", action="store_true",
                           help="under torchrun, convert plain BatchNorm2d layers (shortcuts) to SyncBatchNorm; the "
                                "fused Blocks keep per-rank batch statistics")
    run_group.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


_UNSET = object()


def given_options(parser: argparse.ArgumentParser, argv, args: argparse.Namespace) -> set[str]:
    """The options the command line gave (argparse fills in a default only where the namespace has no value yet:
    parsed again into a namespace of placeholders, what is still a placeholder was not given)."""
    probe = parser.parse_args(argv, namespace=argparse.Namespace(**{k: _UNSET for k in vars(args)}))
    return {k for k, v in vars(probe).items() if v is not _UNSET}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.given = given_options(parser, argv, args)
    if args.list_presets:
        for name, recipe in PRESETS.items():
            print(f"{name:14s} {recipe.description}")
        return 0

    def say(*a, **kw):
        print(*a, **kw)

    try:
        return run(args, say)
    except (DataError, RunError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BackendUnavailable as exc:
        print(f"error: {exc}\n(--backend auto picks the best backend this machine has)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before training started: nothing to save
        print("\ninterrupted before training started; nothing was saved", file=sys.stderr)
        return 130
