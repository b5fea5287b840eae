"""The backend contract and its registry: which implementations exist, where they run, how ``auto`` chooses.

Every fused backend is a module with three functions (fastblock/triton_backend.py, fastblock/extension.py):

    status(device_type) -> BackendStatus              can it run on this device type, and why (not)
    forward(x, gates, weight, bias, bn_weight, bn_bias, running_mean, running_var,
            use_batch_stats, momentum, eps, stride, pad_h, pad_w, save_for_backward, activation="relu", pool=False)
            -> (y, z, mean, invstd)
    backward(dy, x, gates, weight, bias, bn_weight, bn_bias, z, mean, invstd, use_batch_stats, stride, pad_h, pad_w,
             need_dx=True, need_dgates=True, activation="relu", pool=False)
            -> (dx, dgates, dweight, dbias, dbn_weight, dbn_bias)

``activation`` ("relu" or "gelu", fastblock.reference.ACTIVATIONS) is what follows BatchNorm; ``pool`` puts a 2x2
max-pool (``F.max_pool2d(z, 2)``) between the convolutions and BatchNorm; the seam always passes both. z is the
convolutions' output (saved for backward -- before pooling: the backward recomputes the pooled map and its argmax
from it; an empty tensor when not needed); mean/invstd are the per-channel statistics that normalised it (or its
pooled map) (batch statistics when ``use_batch_stats``, else the running ones),
in float32 (float64 for float64 data). Every tensor argument may have any strides; running statistics are
updated in place when given and ``use_batch_stats``. y and dx are laid out like x. dx / dgates not asked for
(``need_dx`` / ``need_dgates`` False: the input or the gates do not require grad) come back as empty tensors, and
a backend skips the work only they need (the first Block's input gradient, an ungated Block's gate gradient).

A ``Backend`` record names such a module (through a loader function, so importing fastblock imports no kernel
library) and says where it runs and where it stands in the ``auto`` order. Adding a backend is one module plus
one ``register_backend(Backend(...))``. ``reference`` (pure PyTorch, fastblock/reference.py) is registered too;
it is called directly, autograd doing its backward.

``auto`` takes the first backend in ``auto_rank`` order that runs on the tensors' device, supports the problem and
passes its runtime self-check there (fastblock/self_check.py: once per device and dtype, against the reference).
``FASTBLOCK_BACKEND`` overrides ``auto`` (never an explicit choice). An explicitly requested backend that cannot
run raises ``RuntimeError`` with the reason and the fix; it never silently falls back.
"""
from __future__ import annotations

import dataclasses
import os
from types import ModuleType
from typing import Any, Callable, Optional, Union

import torch

from . import self_check
from .backend_utils import BackendStatus


def _load_triton() -> ModuleType:
    from . import triton_backend

    return triton_backend


def _load_extension() -> ModuleType:
    from . import extension

    return extension


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of the op.

    name: what users pass as ``backend=``; aliases: other accepted names.
    devices: device types it can run on at all, None for any (``status`` then says whether it does here).
    auto_devices: device types on which ``auto`` may pick it, None for any (a backend may run somewhere only for
        tests, as Triton's CPU interpreter).
    auto_rank: its place in the ``auto`` order (lower first).
    auto_min_capability: on CUDA devices of a lower compute capability ``auto`` passes over it (it still runs
        when requested by name).
    load: returns the module implementing ``status``/``forward``/``backward`` (None: the reference).
    fake_saved_z: ``(x, weight, shape) -> tensor``: what its forward saves for backward, as the fake kernel must
        describe it (None: z, laid out like x).
    max_convs: the largest K it supports (None: any); ``auto`` passes over it for larger K.
    fix_hint: what to do when it is requested and cannot run.
    """

    name: str
    devices: Optional[tuple[str, ...]]
    auto_devices: Optional[tuple[str, ...]]
    auto_rank: int
    load: Optional[Callable[[], ModuleType]]
    aliases: tuple[str, ...] = ()
    fake_saved_z: Optional[Callable[..., Any]] = None
    max_convs: Optional[int] = None
    auto_min_capability: Optional[tuple[int, int]] = None
    fix_hint: str = ""

    @property
    def fused(self) -> bool:
        return self.load is not None

    def module(self) -> ModuleType:
        if self.load is None:
            raise TypeError(f"backend {self.name!r} has no kernel module")
        return self.load()

    def status(self, device_type: str) -> BackendStatus:
        if self.devices is not None and device_type not in self.devices:
            return BackendStatus(False, f"{self.name} runs on {'/'.join(self.devices)} tensors, not {device_type}")
        if self.load is None:
            return BackendStatus(True, "pure PyTorch, runs everywhere")
        try:
            module = self.module()
        except Exception as exc:  # an import error is a reason, not a crash
            return BackendStatus(False, f"import failed: {type(exc).__name__}: {exc}")
        failed = self_check.failures_on(self.name, device_type)
        return BackendStatus(False, failed) if failed else module.status(device_type)

    def unsupported(self, num_convs: int) -> Optional[str]:
        """Why this backend cannot run a problem with ``num_convs`` kernels, or None."""
        if self.max_convs is not None and num_convs > self.max_convs:
            return f"{self.name} supports at most K={self.max_convs} convolutions, got K={num_convs}"
        return None


_REGISTRY: dict[str, Backend] = {}
_ALIASES: dict[str, str] = {}


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend; its name and aliases become valid ``backend=`` values everywhere."""
    for name in (backend.name, *backend.aliases):
        owner = _ALIASES.get(name)
        if owner is not None and owner != backend.name:
            raise ValueError(f"backend name {name!r} is already taken by {owner!r}")
    _REGISTRY[backend.name] = backend
    for name in (backend.name, *backend.aliases):
        _ALIASES[name] = backend.name


def unregister_backend(name: str) -> None:
    backend = _REGISTRY.pop(canonical_name(name))
    for alias in (backend.name, *backend.aliases):
        _ALIASES.pop(alias, None)


# Triton below sm_80 (T4, V100): its 16-bit dot products have no tensor-core path there and its kernels spill
# (the AOT audit), while cuDNN, under the extension, has both: auto takes the extension on those GPUs.
register_backend(Backend(
    name="triton", devices=("cuda", "cpu"), auto_devices=("cuda",), auto_rank=0, load=_load_triton,
    auto_min_capability=(8, 0),
    fix_hint="install triton and run on a CUDA device (or set TRITON_INTERPRET=1 before importing fastblock to "
             "use the slow CPU interpreter), or pass backend='reference'"))
register_backend(Backend(
    name="extension", aliases=("cuda",), devices=("cpu", "cuda"), auto_devices=("cpu", "cuda"), auto_rank=1,
    load=_load_extension, fake_saved_z=lambda x, weight, shape: _load_extension().fake_saved_z(x, weight, shape),
    max_convs=16,
    fix_hint="install a C++ compiler and ninja (and nvcc for CUDA tensors), see `fastblock.available_backends()`; "
             "or pass backend='reference'"))
register_backend(Backend(
    name="reference", devices=None, auto_devices=None, auto_rank=99, load=None))


def backend_names() -> tuple[str, ...]:
    """Registered backends' names, in ``auto`` order."""
    return tuple(b.name for b in sorted(_REGISTRY.values(), key=lambda b: b.auto_rank))


def accepted_names() -> tuple[str, ...]:
    """Everything ``backend=`` accepts: "auto", the names, and the aliases."""
    return ("auto", *backend_names(), *(a for a in _ALIASES if a not in _REGISTRY))


def canonical_name(name: str) -> str:
    """The backend's name for a name or alias ("cuda" -> "extension"); ValueError for an unknown one."""
    try:
        return _ALIASES[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; expected one of {accepted_names()}") from None


def get_backend(name: str) -> Backend:
    return _REGISTRY[canonical_name(name)]


def _device_type(device: Union[str, torch.device, None]) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def device_from_text(text: str) -> torch.device:
    """The device a command line names ("cpu", "cuda", "cuda:N") if this machine has it, else ValueError with a
    one-line reason (torch's own errors for these are tracebacks from deep inside torch.cuda)."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"not a device: {text!r} (cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{text!r}: fastblock runs on cpu and cuda devices")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{text!r}: no CUDA device is available here (torch {torch.__version__}"
                             f"{', a CPU-only build' if torch.version.cuda is None else ''})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def backend_status(name: str, device: Union[str, torch.device, None] = None) -> BackendStatus:
    return get_backend(name).status(_device_type(device))


def available_backends(device: Union[str, torch.device, None] = None) -> dict[str, BackendStatus]:
    """Report every backend for ``device`` (default: CUDA if present, else CPU) as available or not, with why."""
    return {name: backend_status(name, device) for name in backend_names()}


def resolve_backend(requested: Optional[str], device: Union[str, torch.device], num_convs: int = 1,
                    dtype: Optional[torch.dtype] = None) -> str:
    """Turn ``requested`` ("auto", a name or an alias) into the name of a backend that can run a problem with
    ``num_convs`` kernels on ``device``, or raise. With ``dtype``, ``auto`` also self-checks its choice there."""
    device = torch.device(device) if device is not None else torch.device(_device_type(None))
    env_choice = os.environ.get("FASTBLOCK_BACKEND", "auto") or "auto"
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    while True:
        name = _resolve(requested, device.type, env_choice, int(num_convs), capability)
        automatic = (requested in (None, "auto")) and env_choice == "auto"
        if (not automatic or dtype is None or not _REGISTRY[name].fused or not self_check.enabled()
                or torch.compiler.is_compiling()):
            return name
        if self_check.passes(name, _REGISTRY[name].module(), device, dtype):
            return name
        # failed: recorded, so the backend now reports itself unavailable on this device type and auto moves on


@torch.compiler.assume_constant_result
def _resolve(requested: Optional[str], device_type: str, env_choice: str, num_convs: int,
             capability: Optional[tuple[int, int]] = None) -> str:
    # Host-side bookkeeping (imports, extension builds): torch.compile runs it once at trace time and keeps the
    # answer as a constant instead of tracing it.
    requested = "auto" if requested is None else requested
    if requested == "auto":
        requested = env_choice
        if requested != "auto" and requested not in _ALIASES:
            raise ValueError(f"FASTBLOCK_BACKEND={requested!r} is not one of {accepted_names()}")
    if requested != "auto":
        backend = get_backend(requested)
        status = backend.status(device_type)
        why = None if status.available else status.reason
        why = why or backend.unsupported(num_convs)
        if why:
            raise RuntimeError(f"fastblock backend {backend.name!r} cannot run on {device_type} tensors: {why}. "
                               f"To fix: {backend.fix_hint or 'pass backend=' + repr('reference')}")
        return backend.name
    for name in backend_names():
        backend = _REGISTRY[name]
        too_old = (device_type == "cuda" and capability is not None and backend.auto_min_capability is not None
                   and tuple(capability) < backend.auto_min_capability)
        if ((backend.auto_devices is None or device_type in backend.auto_devices) and not too_old
                and backend.unsupported(num_convs) is None and backend.status(device_type).available):
            return name
    return "reference"
