"""The CIFAR-10 trainer: ``python -m fastblock.train`` (cli.py: the command line; presets.py: the recipes;
loop.py: the run -- build, resume, train steps, evaluate, save; optim.py: Muon for the Blocks' filters;
records.py: metrics, steps, plots)."""
from .cli import build_parser, main
from .loop import (BackendUnavailable, RunError, amp_dtype_for, augment, channels_last_for, evaluate, lr_factor,
                   make_ema, make_optimizer, param_groups, resolve_config)
from .presets import PRESETS, Recipe, default_preset, resolve_preset
from .records import METRIC_FIELDS, STEP_FIELDS

__all__ = ["BackendUnavailable", "METRIC_FIELDS", "PRESETS", "Recipe", "RunError", "STEP_FIELDS", "amp_dtype_for",
           "augment", "build_parser", "channels_last_for", "default_preset", "evaluate", "lr_factor", "main",
           "make_ema", "make_optimizer", "param_groups", "resolve_config", "resolve_preset"]
