"""Helpers every backend shares, below the seam: the status type, output shapes and layouts, buffer allocation,
the fake (meta) outputs of the op contract, and the test switch that forces a schedule.

Imports point one way: ``ops`` -> ``backends`` -> the backend modules -> this module. Nothing here imports a
backend or the dispatcher.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional

import torch


class BackendStatus(NamedTuple):
    available: bool
    reason: str

    def __repr__(self) -> str:
        return f"{'available' if self.available else 'unavailable'}: {self.reason}"


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """BatchNorm statistics are float32, or float64 when the data is float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def output_shape(x: torch.Tensor, weight: torch.Tensor, stride: int, pad_h: int, pad_w: int) -> tuple[int, ...]:
    n, _, h, w = x.shape
    _, cout, _, kh, kw = weight.shape
    return n, cout, (h + 2 * pad_h - kh) // stride + 1, (w + 2 * pad_w - kw) // stride + 1


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor stored channels-last (and not also plain contiguous), else contiguous."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def empty_like_layout(x: torch.Tensor, shape, dtype=None) -> torch.Tensor:
    """An empty NCHW tensor of ``shape`` laid out like ``x`` (channels_last stays channels_last)."""
    return torch.empty(shape, dtype=dtype or x.dtype, device=x.device, memory_format=memory_format(x))


def empty_buffer(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """A scratch/output buffer a kernel must fill completely. (Tests run with
    ``torch.utils.deterministic.fill_uninitialized_memory``: it starts as NaN there, so an unwritten element shows.)"""
    return torch.empty(shape, dtype=dtype, device=device)


def pooled_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape after a 2x2 max-pool (stride 2, odd rows/columns dropped, as ``F.max_pool2d(z, 2)``)."""
    n, c, h, w = shape
    return n, c, h // 2, w // 2


def fake_forward_outputs(x, weight, stride, pad_h, pad_w, save_for_backward, saved_z=None, pool=False):
    """(y, z, mean, invstd) with the shapes, dtypes and layouts the backends' forwards return: y laid out like x
    (pooled when ``pool``); z (what the forward saves for its backward: the convolutions' output, before any
    pooling) like x too, unless the backend says otherwise (``saved_z(x, weight, shape)`` returns its fake)."""
    shape = output_shape(x, weight, stride, pad_h, pad_w)
    y = empty_like_layout(x, pooled_shape(shape) if pool else shape)
    if not save_for_backward:
        z = x.new_empty((0,))
    else:
        z = saved_z(x, weight, shape) if saved_z is not None else empty_like_layout(x, shape)
    sdt = stats_dtype(x.dtype)
    return y, z, x.new_empty((shape[1],), dtype=sdt), x.new_empty((shape[1],), dtype=sdt)


def fake_backward_outputs(x, gates, weight, bias, bn_weight, bn_bias, need_dx=True, need_dgates=True):
    """(dx, dgates, dweight, dbias, dbn_weight, dbn_bias) as every backend's backward returns them: dx laid out
    like x, the others contiguous whatever their input's strides (a Block moved to channels_last holds its
    weight with channels-last strides; its gradient still comes back contiguous); dx / dgates empty when not
    asked for."""
    def fresh(t):
        return torch.empty(t.shape, dtype=t.dtype, device=t.device)

    dx = empty_like_layout(x, x.shape) if need_dx else x.new_empty((0,))
    dgates = fresh(gates) if need_dgates else gates.new_empty((0,))
    return dx, dgates, fresh(weight), fresh(bias), fresh(bn_weight), fresh(bn_bias)


# ----------------------------------------------------------------------------------------------------------------
# Forcing a schedule (tests): both compiled backends have two exact schedules, per-sample kernel mixing ("mix")
# and the K-fold concatenation ("concat"), chosen per shape. Tests force each on tiny shapes.
# ----------------------------------------------------------------------------------------------------------------
SCHEDULES = ("mix", "concat")
_forced_schedule: Optional[str] = None


def forced_schedule() -> Optional[str]:
    """The schedule every backend must use, or None for each backend's own rule."""
    return _forced_schedule


@contextlib.contextmanager
def force_schedule(schedule: Optional[str]):
    """``with force_schedule("concat"): ...`` runs every compiled backend with that schedule (None: their rule)."""
    global _forced_schedule
    if schedule is not None and schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES} or None, got {schedule!r}")
    previous, _forced_schedule = _forced_schedule, schedule
    try:
        yield
    finally:
        _forced_schedule = previous
