"""The seam: ``mixed_conv_bn_relu`` and the torch custom ops every compiled backend plugs into.

    y = ReLU(BatchNorm(sum_k gates[:, k] * conv2d(x, weight[k], bias[k])))

* ``backend="reference"`` runs fastblock.reference directly (plain PyTorch; autograd does the backward).
* ``backend="triton"`` / ``"cuda"`` go through two ``torch.library`` custom ops,
  ``fastblock::mixed_conv_bn_relu_fwd`` and ``fastblock::mixed_conv_bn_relu_bwd``, tied together by an
  autograd.Function. The ops carry fake (meta) implementations, so torch.compile traces them as single
  opaque nodes with ``fullgraph=True``, and the running-statistics update is a declared mutation
  (``mutates_args``), not a hidden side effect. In eager mode the autograd.Function calls the backend
  functions directly (same kernels, without the custom-op layer's Python overhead).

Every backend implements the same two functions (see fastblock/triton_backend.py, fastblock/extension.py):

    forward(x, gates, weight, bias, bn_weight, bn_bias, running_mean, running_var,
            use_batch_stats, momentum, eps, stride, pad_h, pad_w, save_for_backward) -> (y, z, mean, invstd)
    backward(dy, x, gates, weight, bias, bn_weight, bn_bias, z, mean, invstd,
             use_batch_stats, stride, pad_h, pad_w) -> (dx, dgates, dweight, dbias, dbn_weight, dbn_bias)

where z is the pre-BatchNorm activation (saved for backward; an empty tensor when not needed), and
mean/invstd are the per-channel statistics that normalised it (batch statistics when ``use_batch_stats``,
else the running statistics), in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch._subclasses
from torch.autograd.function import once_differentiable

from .backends import backend_module, resolve_backend
from .reference import mixed_conv_bn_relu_reference
from .validation import check_inputs


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """BatchNorm statistics are float32, or float64 when the data is float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def output_shape(x: torch.Tensor, weight: torch.Tensor, stride: int, pad_h: int, pad_w: int) -> tuple[int, ...]:
    n, _, h, w = x.shape
    _, cout, _, kh, kw = weight.shape
    return n, cout, (h + 2 * pad_h - kh) // stride + 1, (w + 2 * pad_w - kw) // stride + 1


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor stored channels-last (and not also plain contiguous), else contiguous."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


# Tests set FASTBLOCK_POISON=1: every buffer a backend allocates starts as NaN, so an element a kernel forgot to
# write shows up as NaN instead of as whatever memory happened to hold.
POISON_BUFFERS = os.environ.get("FASTBLOCK_POISON", "0") == "1"


def _maybe_poison(t: torch.Tensor) -> torch.Tensor:
    if POISON_BUFFERS and t.is_floating_point() and not isinstance(t, torch._subclasses.FakeTensor):
        t.fill_(float("nan"))
    return t


def empty_like_layout(x: torch.Tensor, shape, dtype=None) -> torch.Tensor:
    """An empty NCHW tensor of ``shape`` laid out like ``x`` (channels_last stays channels_last)."""
    return _maybe_poison(torch.empty(shape, dtype=dtype or x.dtype, device=x.device,
                                     memory_format=_memory_format(x)))


def empty_buffer(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """A scratch/output buffer a kernel must fill completely."""
    return _maybe_poison(torch.empty(shape, dtype=dtype, device=device))


# ----------------------------------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("fastblock::mixed_conv_bn_relu_fwd", mutates_args=("running_mean", "running_var"))
def _fused_forward(
    x: torch.Tensor,
    gates: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    use_batch_stats: bool,
    momentum: float,
    eps: float,
    stride: int,
    pad_h: int,
    pad_w: int,
    save_for_backward: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return backend_module(backend).forward(
        x, gates, weight, bias, bn_weight, bn_bias, running_mean, running_var,
        use_batch_stats, momentum, eps, stride, pad_h, pad_w, save_for_backward,
    )


def fake_forward_outputs(x, weight, stride, pad_h, pad_w, save_for_backward, z_nchw=False):
    """(y, z, mean, invstd) with the shapes, dtypes and layouts the backends' forwards return: y laid out like x;
    z (saved for backward only) like x too, except for the extension, which computes and keeps it NCHW
    (``z_nchw``), so a channels-last input costs it no layout copies of z."""
    shape = output_shape(x, weight, stride, pad_h, pad_w)
    y = empty_like_layout(x, shape)
    if not save_for_backward:
        z = x.new_empty((0,))
    else:
        z = _maybe_poison(x.new_empty(shape)) if z_nchw else empty_like_layout(x, shape)
    sdt = stats_dtype(x.dtype)
    return y, z, x.new_empty((shape[1],), dtype=sdt), x.new_empty((shape[1],), dtype=sdt)


def fake_backward_outputs(x, gates, weight, bias, bn_weight, bn_bias):
    """(dx, dgates, dweight, dbias, dbn_weight, dbn_bias) as every backend's backward returns them."""
    return (empty_like_layout(x, x.shape), torch.empty_like(gates), torch.empty_like(weight),
            torch.empty_like(bias), torch.empty_like(bn_weight), torch.empty_like(bn_bias))


@_fused_forward.register_fake
def _fused_forward_fake(x, gates, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                        use_batch_stats, momentum, eps, stride, pad_h, pad_w, save_for_backward, backend):
    return fake_forward_outputs(x, weight, stride, pad_h, pad_w, save_for_backward, z_nchw=backend == "cuda")


@torch.library.custom_op("fastblock::mixed_conv_bn_relu_bwd", mutates_args=())
def _fused_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    gates: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    z: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    use_batch_stats: bool,
    stride: int,
    pad_h: int,
    pad_w: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return backend_module(backend).backward(
        dy, x, gates, weight, bias, bn_weight, bn_bias, z, mean, invstd, use_batch_stats, stride, pad_h, pad_w
    )


@_fused_backward.register_fake
def _fused_backward_fake(dy, x, gates, weight, bias, bn_weight, bn_bias, z, mean, invstd,
                         use_batch_stats, stride, pad_h, pad_w, backend):
    return fake_backward_outputs(x, gates, weight, bias, bn_weight, bn_bias)


# Tests set this to run the custom ops in eager mode too.
EAGER_THROUGH_CUSTOM_OPS = False


def _through_custom_ops(x: torch.Tensor) -> bool:
    """Call the backends through the custom ops under torch.compile/export, which need their fake kernels and
    declared mutation, and for tensor subclasses (FakeTensor, ...), which dispatch on them; for plain tensors in
    eager mode call them directly: there the custom-op layer is only Python dispatch overhead (~40-50 us per call
    measured on CPU), which adds up for the small, launch-bound Blocks of a GPU network."""
    return EAGER_THROUGH_CUSTOM_OPS or torch.compiler.is_compiling() or type(x) is not torch.Tensor


class _FusedMixedConvBnRelu(torch.autograd.Function):
    """Ties the two custom ops together for autograd.

    ``register_autograd`` only accepts functional ops, and the forward op mutates the running statistics in
    place (fused into the statistics kernel), so the pairing lives in an autograd.Function, which
    torch.compile traces with ``fullgraph=True``.
    """

    @staticmethod
    def forward(ctx, x, gates, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                use_batch_stats, momentum, eps, stride, pad_h, pad_w, save, backend):
        args = (x, gates, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                use_batch_stats, momentum, eps, stride, pad_h, pad_w, save)
        if _through_custom_ops(x):
            y, z, mean, invstd = _fused_forward(*args, backend)
        else:
            y, z, mean, invstd = backend_module(backend).forward(*args)
            if use_batch_stats:  # what the custom op's declared mutation would do
                for stat in (running_mean, running_var):
                    if stat is not None and not stat.is_inference():
                        torch.autograd.graph.increment_version(stat)
        ctx.save_for_backward(x, gates, weight, bias, bn_weight, bn_bias, z, mean, invstd)
        ctx.config = (use_batch_stats, stride, pad_h, pad_w, backend)
        return y

    @staticmethod
    @once_differentiable  # the backward kernels have no derivative: a second backward raises, never runs silently
    def backward(ctx, dy):
        x, gates, weight, bias, bn_weight, bn_bias, z, mean, invstd = ctx.saved_tensors
        use_batch_stats, stride, pad_h, pad_w, backend = ctx.config
        if z.numel() == 0:
            raise RuntimeError("fastblock: backward through a forward that ran without saving for backward")
        dy = dy.contiguous(memory_format=_memory_format(z))
        args = (dy, x, gates, weight, bias, bn_weight, bn_bias, z, mean, invstd, use_batch_stats, stride, pad_h, pad_w)
        grads = _fused_backward(*args, backend) if _through_custom_ops(dy) else backend_module(backend).backward(*args)
        return (*grads, None, None, None, None, None, None, None, None, None, None)


# ----------------------------------------------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------------------------------------------
def mixed_conv_bn_relu(
    x: torch.Tensor,
    gates: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    bn_weight: Optional[torch.Tensor] = None,
    bn_bias: Optional[torch.Tensor] = None,
    running_mean: Optional[torch.Tensor] = None,
    running_var: Optional[torch.Tensor] = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    stride: int = 1,
    padding=None,
    backend: str = "auto",
) -> torch.Tensor:
    """ReLU(BatchNorm(sum_k gates[:, k] * conv2d(x, weight[k], bias[k]))), fused.

    Args:
        x: [N, Cin, H, W] input (NCHW or channels_last).
        gates: [N, K] per-sample mixing weights, already activated (softmax/sigmoid/...).
        weight: [K, Cout, Cin, kh, kw] the K convolution kernels.
        bias: [K, Cout] or None.
        bn_weight, bn_bias: [Cout] BatchNorm affine parameters, or None (1 and 0).
        running_mean, running_var: [Cout] or None; updated in place (unbiased variance) when training.
        training: batch statistics (True) or running statistics (False). Without running statistics
            batch statistics are always used, like ``nn.BatchNorm2d(track_running_stats=False)``.
        momentum, eps: as in ``nn.BatchNorm2d``.
        stride: convolution stride (int >= 1).
        padding: None ("same" for odd kernels: kh // 2, kw // 2), an int, or (pad_h, pad_w).
        backend: "auto" | "triton" | "cuda" | "reference" (see ``fastblock.available_backends()``).

    Under autocast, x/gates/weight/bias are cast to the autocast dtype (as for a convolution); BatchNorm
    statistics stay float32 and the output has the autocast dtype.
    """
    device_type = x.device.type if isinstance(x, torch.Tensor) else "cpu"
    if isinstance(x, torch.Tensor) and torch.is_autocast_enabled(device_type):
        # Like a convolution under autocast: data and kernels in the low dtype, BatchNorm stays float32.
        low = torch.get_autocast_dtype(device_type)
        x, gates, weight, bias = (_cast_floating(t, low) for t in (x, gates, weight, bias))
        pad_h, pad_w = check_inputs(x, gates, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                    training, momentum, eps, stride, padding)
        with torch.autocast(device_type, enabled=False):
            return _dispatch(x, gates, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                             training, momentum, eps, stride, pad_h, pad_w, backend)
    pad_h, pad_w = check_inputs(x, gates, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                training, momentum, eps, stride, padding)
    return _dispatch(x, gates, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                     training, momentum, eps, stride, pad_h, pad_w, backend)


def _cast_floating(t, dtype):
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype:
        return t.to(dtype)
    return t


def _dispatch(x, gates, weight, bias, bn_weight, bn_bias, running_mean, running_var,
              training, momentum, eps, stride, pad_h, pad_w, backend):
    name = resolve_backend(backend, x.device)
    if name == "reference":
        return mixed_conv_bn_relu_reference(x, gates, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                            training, momentum, eps, stride, (pad_h, pad_w))
    num_convs, cout = weight.shape[0], weight.shape[1]
    sdt = stats_dtype(x.dtype)
    # The custom ops take plain tensors: absent affine/bias parameters become their neutral values.
    if bias is None:
        bias = x.new_zeros((num_convs, cout))
    if bn_weight is None:
        bn_weight = x.new_ones((cout,), dtype=sdt)
    if bn_bias is None:
        bn_bias = x.new_zeros((cout,), dtype=sdt)
    use_batch_stats = bool(training) or running_mean is None
    save = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, gates, weight, bias, bn_weight, bn_bias)
    )
    return _FusedMixedConvBnRelu.apply(
        x, gates, weight, bias, bn_weight, bn_bias, running_mean, running_var,
        use_batch_stats, float(momentum), float(eps), int(stride), pad_h, pad_w, save, name,
    )
