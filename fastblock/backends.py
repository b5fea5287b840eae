"""Backend registry: which implementations can run on which device, and how ``backend="auto"`` chooses.

Backends:
  * ``triton``    -- fused Triton kernels (fastblock/triton_backend.py). CUDA tensors; CPU tensors only
                     under the Triton interpreter (``TRITON_INTERPRET=1`` set before fastblock is imported).
  * ``cuda``      -- the compiled C++/CUDA extension in csrc/ (fastblock/extension.py): C++ code on CPU
                     tensors, CUDA kernels on GPU tensors.
  * ``reference`` -- pure PyTorch (fastblock/reference.py); always available.

``auto`` picks triton -> cuda -> reference on CUDA tensors and cuda -> reference on CPU tensors. The
``FASTBLOCK_BACKEND`` environment variable overrides ``auto`` (never an explicit choice). An explicitly
requested backend that cannot run raises ``RuntimeError`` with the reason; it never silently falls back.
"""
from __future__ import annotations

import importlib
import os
from typing import NamedTuple, Optional, Union

import torch

BACKENDS = ("triton", "cuda", "reference")
_AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cuda", "reference")}
_MODULES = {"triton": "fastblock.triton_backend", "cuda": "fastblock.extension"}
_FIX_HINTS = {
    "triton": "install triton and run on a CUDA device (or set TRITON_INTERPRET=1 before importing fastblock "
    "to use the slow CPU interpreter), or pass backend='reference'",
    "cuda": "install a C++ compiler and ninja (and nvcc for CUDA tensors), see `fastblock.available_backends()`; "
    "or pass backend='reference'",
}


class BackendStatus(NamedTuple):
    available: bool
    reason: str

    def __repr__(self) -> str:
        return f"{'available' if self.available else 'unavailable'}: {self.reason}"


def _device_type(device: Union[str, torch.device, None]) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def backend_module(name: str):
    """The module implementing ``forward``/``backward``/``status`` for a compiled backend."""
    return importlib.import_module(_MODULES[name])


def backend_status(name: str, device: Union[str, torch.device, None] = None) -> BackendStatus:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS + ('auto',)}")
    dev = _device_type(device)
    if name == "reference":
        return BackendStatus(True, "pure PyTorch, runs everywhere")
    if dev not in ("cpu", "cuda"):
        return BackendStatus(False, f"fastblock kernels support cpu and cuda tensors, not {dev}")
    try:
        module = backend_module(name)
    except Exception as exc:  # an import error is a reason, not a crash
        return BackendStatus(False, f"import failed: {type(exc).__name__}: {exc}")
    return module.status(dev)


def available_backends(device: Union[str, torch.device, None] = None) -> dict[str, BackendStatus]:
    """Report every backend for ``device`` (default: CUDA if present, else CPU) as available or not, with why."""
    return {name: backend_status(name, device) for name in BACKENDS}


def resolve_backend(requested: Optional[str], device: Union[str, torch.device]) -> str:
    """Turn ``requested`` ("auto" or a name) into a backend that can run on ``device``, or raise."""
    return _resolve(requested, _device_type(device), os.environ.get("FASTBLOCK_BACKEND", "auto") or "auto")


@torch.compiler.assume_constant_result
def _resolve(requested: Optional[str], device_type: str, env_choice: str) -> str:
    # Host-side bookkeeping (imports, extension builds): torch.compile runs it once at trace time and keeps the
    # answer as a constant instead of tracing it.
    requested = "auto" if requested is None else requested
    if requested == "auto":
        requested = env_choice
        if requested not in BACKENDS + ("auto",):
            raise ValueError(f"FASTBLOCK_BACKEND={requested!r} is not one of {BACKENDS + ('auto',)}")
    if requested != "auto":
        status = backend_status(requested, device_type)
        if not status.available:
            raise RuntimeError(
                f"fastblock backend {requested!r} cannot run on {device_type} tensors: "
                f"{status.reason}. To fix: {_FIX_HINTS.get(requested, '')}"
            )
        return requested
    for name in _AUTO_ORDER.get(device_type, ("reference",)):
        if device_type == "cpu" and name == "triton":
            continue  # the interpreter is for tests, never an automatic choice
        if backend_status(name, device_type).available:
            return name
    return "reference"
