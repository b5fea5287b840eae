"""The seam: ``mixed_conv_bn_relu`` and the torch custom ops every fused backend plugs into.

    y = ReLU(BatchNorm(sum_k gates[:, k] * conv2d(x, weight[k], bias[k])))

(or GELU in place of ReLU; with ``pool=True`` a 2x2 max-pool between the sum and BatchNorm.)

* ``backend="reference"`` runs fastblock.reference directly (plain PyTorch; autograd does the backward).
* A fused backend (``"triton"``, ``"extension"``, or any registered one; the contract is in fastblock/backends.py)
  goes through two ``torch.library`` custom ops, ``fastblock::mixed_conv_bn_relu_fwd`` and
  ``fastblock::mixed_conv_bn_relu_bwd``, tied together by an autograd.Function. The ops carry fake (meta)
  implementations, so torch.compile traces them as single opaque nodes with ``fullgraph=True``, and the
  running-statistics update is a declared mutation (``mutates_args``), not a hidden side effect. In eager mode
  the autograd.Function calls the backend functions directly (same kernels, without the custom-op layer's
  Python overhead).
* ``max_pool2x2`` is ``F.max_pool2d(x, 2)`` -- the pooling between the speed-run networks' Blocks -- run by the
  extension's CPU kernel where it applies: it keeps one byte per output for the backward where ATen keeps an int64
  index, and its backward writes the input gradient once instead of zero-filling it and scattering into it.
* Double backward (``create_graph=True``: gradient penalties, Hessian-vector products) through a fused backend
  recomputes the Block's graph in plain PyTorch from the saved inputs and differentiates that, so second-order
  terms are exact; first-order backward always runs the fused kernels.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .backend_utils import fake_backward_outputs, fake_forward_outputs, memory_format, stats_dtype
from .backends import get_backend, resolve_backend
from .reference import ACTIVATIONS, gated_conv_reference, mixed_conv_bn_relu_reference
from .validation import check_inputs


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
    activation: str,
    pool: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return get_backend(backend).module().forward(
        x, gates, weight, bias, bn_weight, bn_bias, running_mean, running_var,
        use_batch_stats, momentum, eps, stride, pad_h, pad_w, save_for_backward, activation=activation, pool=pool,
    )


@_fused_forward.register_fake
def _fused_forward_fake(x, gates, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                        use_batch_stats, momentum, eps, stride, pad_h, pad_w, save_for_backward, activation,
                        pool, backend):
    return fake_forward_outputs(x, weight, stride, pad_h, pad_w, save_for_backward,
                                saved_z=get_backend(backend).fake_saved_z, pool=pool)


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
    need_dx: bool,
    need_dgates: bool,
    activation: str,
    pool: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return get_backend(backend).module().backward(
        dy, x, gates, weight, bias, bn_weight, bn_bias, z, mean, invstd, use_batch_stats, stride, pad_h, pad_w,
        need_dx, need_dgates, activation=activation, pool=pool,
    )


@_fused_backward.register_fake
def _fused_backward_fake(dy, x, gates, weight, bias, bn_weight, bn_bias, z, mean, invstd,
                         use_batch_stats, stride, pad_h, pad_w, need_dx, need_dgates, activation, pool, backend):
    return fake_backward_outputs(x, gates, weight, bias, bn_weight, bn_bias, need_dx, need_dgates)


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
                use_batch_stats, momentum, eps, stride, pad_h, pad_w, save, activation, pool, backend):
        args = (x, gates, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                use_batch_stats, momentum, eps, stride, pad_h, pad_w, save)
        if _through_custom_ops(x):
            y, z, mean, invstd = _fused_forward(*args, activation, pool, backend)
        else:
            y, z, mean, invstd = get_backend(backend).module().forward(*args, activation=activation, pool=pool)
            if use_batch_stats:  # what the custom op's declared mutation would do
                for stat in (running_mean, running_var):
                    if stat is not None and not stat.is_inference():
                        torch.autograd.graph.increment_version(stat)
        ctx.save_for_backward(x, gates, weight, bias, bn_weight, bn_bias, z, mean, invstd)
        ctx.config = (use_batch_stats, eps, stride, pad_h, pad_w, activation, pool, backend)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, gates, weight, bias, bn_weight, bn_bias, z, mean, invstd = ctx.saved_tensors
        use_batch_stats, eps, stride, pad_h, pad_w, activation, pool, backend = ctx.config
        if torch.is_grad_enabled():  # create_graph=True: the gradients must themselves be differentiable
            grads = _differentiable_backward(dy, x, gates, weight, bias, bn_weight, bn_bias, mean, invstd,
                                             use_batch_stats, eps, stride, pad_h, pad_w, activation, pool)
            return (*grads, *_NO_GRADS)
        if z.numel() == 0:
            raise RuntimeError("fastblock: backward through a forward that ran without saving for backward")
        dy = dy.contiguous(memory_format=memory_format(z))  # (a pooled dy: z's layout at its own size)
        # Only the gradients autograd wants: an input that needs none (the first Block's, behind frozen layers)
        # skips the convolution's input gradient, ungated gates (a K=1 Block's constant 1) their reduction.
        need_dx, need_dgates = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        args = (dy, x, gates, weight, bias, bn_weight, bn_bias, z, mean, invstd, use_batch_stats, stride, pad_h, pad_w,
                need_dx, need_dgates)
        if _through_custom_ops(dy):
            grads = _fused_backward(*args, activation, pool, backend)
        else:
            grads = get_backend(backend).module().backward(*args, activation=activation, pool=pool)
        dx, dgates = (grads[0] if need_dx else None), (grads[1] if need_dgates else None)
        return (dx, dgates, *grads[2:], *_NO_GRADS)


# forward's arguments after the six differentiable ones (running statistics, flags, names): no gradients
_NO_GRADS = (None,) * 12


def _differentiable_backward(dy, x, gates, weight, bias, bn_weight, bn_bias, mean, invstd,
                             use_batch_stats, eps, stride, pad_h, pad_w, activation, pool):
    """The six input gradients as a differentiable function of the inputs (and of dy): the Block recomputed in
    plain PyTorch -- the reference's formulation, with the statistics the forward normalised with in eval mode --
    and differentiated with ``create_graph=True``. Only runs for double backward."""
    # Fresh aliases: gradients w.r.t. them are the partial derivatives by each argument. (Differentiating w.r.t. x
    # itself would also follow paths from x into the other arguments -- the Block's gates are computed from x --
    # which autograd then counts a second time outside this op.)
    inputs = tuple(t.view_as(t) for t in (x, gates, weight, bias, bn_weight, bn_bias))
    x, gates, weight, bias, bn_weight, bn_bias = inputs
    z = gated_conv_reference(x, gates, weight, bias, stride, (pad_h, pad_w))
    if pool:
        z = F.max_pool2d(z, 2)
    if use_batch_stats:
        normed = F.batch_norm(z, None, None, bn_weight, bn_bias, training=True, momentum=0.0, eps=eps)
    else:
        scale = (invstd * bn_weight).view(1, -1, 1, 1)
        normed = ((z - mean.view(1, -1, 1, 1)) * scale + bn_bias.view(1, -1, 1, 1)).to(z.dtype)
    y = ACTIVATIONS[activation](normed)
    wanted = [t for t in inputs if t.requires_grad]
    found = iter(torch.autograd.grad(y, wanted, dy, create_graph=True, allow_unused=True) if wanted else ())
    grads = []
    for t in inputs:
        g = next(found) if t.requires_grad else None
        grads.append(torch.zeros_like(t) if g is None and t.requires_grad else g)
    return grads


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
    activation: str = "relu",
    pool: bool = False,
) -> torch.Tensor:
    """ReLU(BatchNorm(sum_k gates[:, k] * conv2d(x, weight[k], bias[k]))), fused (or GELU in place of ReLU).

    Args:
        x: [N, Cin, H, W] input (any strides; NCHW or channels_last).
        gates: [N, K] per-sample mixing weights, already activated (softmax/sigmoid/...).
        weight: [K, Cout, Cin, kh, kw] the K convolution kernels.
        bias: [K, Cout] or None.
        bn_weight, bn_bias: [Cout] BatchNorm affine parameters, or None (1 and 0).
        running_mean, running_var: [Cout] or None; updated in place (unbiased variance) when training.
        training: batch statistics (True) or running statistics (False). Without running statistics
            batch statistics are always used, like ``nn.BatchNorm2d(track_running_stats=False)``.
        momentum, eps: as in ``nn.BatchNorm2d`` (for ``momentum=None``, a cumulative average, use ``Block``,
            which counts the batches, or pass ``1 / num_batches``).
        stride: convolution stride (int >= 1).
        padding: None ("same" for odd kernels: kh // 2, kw // 2), an int, or (pad_h, pad_w).
        backend: "auto", a backend name or alias (see ``fastblock.available_backends()``).
        activation: "relu" (default) or "gelu" (exact, as ``F.gelu``): the activation after BatchNorm.
        pool: a 2x2 max-pool (``F.max_pool2d(z, 2)``) between the convolutions and BatchNorm: BatchNorm and the
            activation then run on a quarter of the pixels, with the pooled map's statistics (the order of the
            public speed-runs' conv -> pool -> BN -> activation). The output is the pooled size.

    BatchNorm tensors have x's dtype, or float32 when x is float16/bfloat16 (the rule of ``nn.BatchNorm2d``).
    Under autocast, x/gates/weight/bias are cast to the autocast dtype (as for a convolution); BatchNorm
    statistics stay float32 and the output has the autocast dtype.
    """
    if isinstance(x, torch.Tensor) and autocast_enabled(x.device.type):
        # Like a convolution under autocast: data and kernels in the low dtype, BatchNorm stays float32.
        low = torch.get_autocast_dtype(x.device.type)
        x, gates, weight, bias = (_cast_floating(t, low) for t in (x, gates, weight, bias))
        with torch.autocast(x.device.type, enabled=False):
            return _validate_and_dispatch(x, gates, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                          training, momentum, eps, stride, padding, backend, activation, pool)
    return _validate_and_dispatch(x, gates, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                  training, momentum, eps, stride, padding, backend, activation, pool)


def autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta, ...): no autocast there
        return False


def _cast_floating(t, dtype):
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype:
        return t.to(dtype)
    return t


def _validate_and_dispatch(x, gates, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                           training, momentum, eps, stride, padding, backend, activation, pool):
    pad_h, pad_w = check_inputs(x, gates, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                training, momentum, eps, stride, padding, pool)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    name = resolve_backend(backend, x.device, weight.shape[0], x.dtype)
    if name == "reference":
        return mixed_conv_bn_relu_reference(x, gates, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                            training, momentum, eps, stride, (pad_h, pad_w), activation, pool)
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
        use_batch_stats, float(momentum), float(eps), int(stride), pad_h, pad_w, save, activation, bool(pool), name,
    )


# ----------------------------------------------------------------------------------------------------------------
# 2x2 max-pooling
# ----------------------------------------------------------------------------------------------------------------
_POOLED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def max_pool2x2(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``F.max_pool2d(x, 2)`` with the same values and gradients (the first maximum of a window in row-major order
    takes its gradient, a NaN wins over numbers): on a 4-d CPU tensor the extension's kernel when ``backend``
    resolves to the extension, else ``F.max_pool2d`` itself (GPU tensors, the reference and Triton backends,
    torch.compile, anything the kernel does not take)."""
    if _pool_in_extension(x, backend):
        return _MaxPool2x2.apply(x)
    return F.max_pool2d(x, 2)


def _pool_in_extension(x, backend: str) -> bool:
    if (type(x) is not torch.Tensor or x.device.type != "cpu" or x.dim() != 4 or x.dtype not in _POOLED_DTYPES
            or x.shape[2] < 2 or x.shape[3] < 2 or torch.compiler.is_compiling()):
        return False
    return resolve_backend(backend, x.device) == "extension"


class _MaxPool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y, argmax = get_backend("extension").module().max_pool2x2(x, ctx.needs_input_grad[0])
        ctx.save_for_backward(argmax)
        ctx.input_size = (x.shape[2], x.shape[3])
        return y

    @staticmethod
    def backward(ctx, grad):
        (argmax,) = ctx.saved_tensors
        height, width = ctx.input_size
        if torch.is_grad_enabled():  # create_graph=True: the routing, differentiable w.r.t. grad
            return _route_to_maxima(grad, argmax, height, width)
        return get_backend("extension").module().max_pool2x2_backward(grad, argmax, height, width)


def _route_to_maxima(grad, argmax, height, width):
    """Each window's gradient at the position ``argmax`` names, 0 elsewhere, in differentiable PyTorch."""
    n, c, oh, ow = grad.shape
    picked = F.one_hot(argmax.long(), 4).bool()  # [N, C, OH, OW, 4]
    routed = torch.where(picked, grad.unsqueeze(-1), grad.new_zeros(()))
    routed = routed.view(n, c, oh, ow, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, c, 2 * oh, 2 * ow)
    return F.pad(routed, (0, width - 2 * ow, 0, height - 2 * oh))
