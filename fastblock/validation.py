"""Argument checks shared by every backend, so bad input fails here with a clear message and never deep in a kernel."""
from __future__ import annotations

from typing import Optional, Union

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: Optional[torch.Tensor]) -> str:
    return "None" if t is None else str(tuple(t.shape))


def normalize_padding(padding: Union[None, int, tuple, list], kernel_hw: tuple[int, int]) -> tuple[int, int]:
    if padding is None:
        return kernel_hw[0] // 2, kernel_hw[1] // 2
    if isinstance(padding, int) and not isinstance(padding, bool):
        pads = (padding, padding)
    elif isinstance(padding, (tuple, list)) and len(padding) == 2 and all(isinstance(p, int) for p in padding):
        pads = (int(padding[0]), int(padding[1]))
    else:
        raise ValueError(f"padding must be None, an int or a pair of ints, got {padding!r}")
    if min(pads) < 0:
        raise ValueError(f"padding must be >= 0, got {pads}")
    return pads


def check_inputs(
    x: torch.Tensor,
    gates: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    bn_weight: Optional[torch.Tensor],
    bn_bias: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    training: bool,
    momentum: float,
    eps: float,
    stride: int,
    padding,
    pool: bool = False,
) -> tuple[int, int]:
    """Validate the ``mixed_conv_bn_relu`` arguments; return the normalised (pad_h, pad_w)."""
    named = {
        "x": x, "gates": gates, "weight": weight, "bias": bias, "bn_weight": bn_weight, "bn_bias": bn_bias,
        "running_mean": running_mean, "running_var": running_var,
    }
    for name, t in named.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [N, Cin, H, W], got shape {_shape(x)}")
    if gates.dim() != 2:
        raise ValueError(f"gates must be 2-D [N, K], got shape {_shape(gates)}")
    if weight.dim() != 5:
        raise ValueError(f"weight must be 5-D [K, Cout, Cin, kh, kw], got shape {_shape(weight)}")
    n, cin, h, w = x.shape
    k, cout, wcin, kh, kw = weight.shape
    if gates.shape[0] != n:
        raise ValueError(f"gates has {gates.shape[0]} rows but x has batch size {n} "
                         f"(gates {_shape(gates)}, x {_shape(x)})")
    if gates.shape[1] != k:
        raise ValueError(
            f"K mismatch: gates {_shape(gates)} has {gates.shape[1]} gate(s) per sample but weight {_shape(weight)} "
            f"has K={k} kernels"
        )
    if wcin != cin:
        raise ValueError(f"Cin mismatch: x {_shape(x)} has {cin} channels but weight {_shape(weight)} expects {wcin}")
    if k < 1 or cout < 1 or kh < 1 or kw < 1:
        raise ValueError(f"weight {_shape(weight)} must have K, Cout, kh, kw >= 1")
    if bias is not None and tuple(bias.shape) != (k, cout):
        raise ValueError(f"bias must have shape (K, Cout) = {(k, cout)}, got {_shape(bias)}")
    for name in ("bn_weight", "bn_bias", "running_mean", "running_var"):
        t = named[name]
        if t is not None and tuple(t.shape) != (cout,):
            raise ValueError(f"{name} must have shape (Cout,) = ({cout},), got {_shape(t)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")

    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be a floating tensor (float16/bfloat16/float32/float64), got {x.dtype}")
    for name in ("gates", "weight", "bias"):
        t = named[name]
        if t is not None and t.dtype != x.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but x has {x.dtype}; x, gates, weight and bias must share one dtype "
                "(use torch.autocast for mixed precision)"
            )
    # nn.BatchNorm2d's rule: parameters and statistics in x's dtype, or float32 for float16/bfloat16 x.
    bn_dtypes = (x.dtype, torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else (x.dtype,)
    for name in ("bn_weight", "bn_bias", "running_mean", "running_var"):
        t = named[name]
        if t is not None and t.dtype not in bn_dtypes:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; BatchNorm parameters and statistics "
                            f"must have x's dtype{' or float32' if len(bn_dtypes) > 1 else ''} (as in nn.BatchNorm2d)")
    for name in ("running_mean", "running_var"):
        t = named[name]
        if t is not None and t.requires_grad:
            raise ValueError(f"{name} requires grad; running statistics are buffers updated in place, not parameters")
    for name, t in named.items():
        if t is not None and t.device != x.device:
            raise RuntimeError(f"{name} is on {t.device} but x is on {x.device}; all tensors must be on one device")

    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be an int >= 1, got {stride!r}")
    if momentum is None:
        raise ValueError("momentum=None (a cumulative average) needs the number of batches seen: use fastblock.Block, "
                         "which counts them as nn.BatchNorm2d does, or pass momentum=1/num_batches")
    if not (0.0 <= float(momentum) <= 1.0):
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    if not float(eps) > 0.0:
        raise ValueError(f"eps must be > 0, got {eps}")
    pad_h, pad_w = normalize_padding(padding, (kh, kw))
    if n == 0:
        raise ValueError(f"empty batch: x has shape {_shape(x)}")
    if cin == 0:
        raise ValueError(f"x has no input channels: shape {_shape(x)}")
    h_out = (h + 2 * pad_h - kh) // stride + 1
    w_out = (w + 2 * pad_w - kw) // stride + 1
    if h_out < 1 or w_out < 1:
        raise ValueError(
            f"input {h}x{w} is too small for a {kh}x{kw} kernel with padding {(pad_h, pad_w)} and stride {stride}"
        )
    if pool:
        if h_out < 2 or w_out < 2:
            raise ValueError(f"pool=True needs a convolution output of at least 2x2 for its 2x2 max-pool, got "
                             f"{h_out}x{w_out} (input {h}x{w}, kernel {kh}x{kw}, stride {stride})")
        h_out, w_out = h_out // 2, w_out // 2
    if (training or running_mean is None) and n * h_out * w_out <= 1:
        raise ValueError(
            f"BatchNorm with batch statistics needs more than 1 value per channel, got "
            f"{'pooled ' if pool else ''}output [N={n}, Cout={cout}, {h_out}x{w_out}] "
            f"(use eval mode with running statistics for a single pixel)"
        )
    return pad_h, pad_w
