"""Pure-PyTorch reference of the fused Block op: the ground truth every other backend is tested against.

It is deliberately the literal coursework formulation -- K separate convolutions, a gate-weighted sum,
BatchNorm, ReLU -- and autograd provides its backward. Keep it obvious; do not optimise it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

# The activations the fused op can end in (its ``activation`` argument): ReLU, or GELU with the exact (erf) normal
# CDF, F.gelu's default.
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


def gated_conv_reference(x: torch.Tensor, gates: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         stride: int, padding: tuple[int, int]) -> torch.Tensor:
    """sum_k gates[:, k] * conv2d(x, weight[k], bias[k]): the pre-BatchNorm activation z."""
    mixed = None
    for k in range(weight.shape[0]):
        branch = F.conv2d(x, weight[k], None if bias is None else bias[k], stride=stride, padding=padding)
        term = gates[:, k].view(-1, 1, 1, 1) * branch
        mixed = term if mixed is None else mixed + term
    return mixed


def mixed_conv_bn_reference(
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
    padding: tuple[int, int],
    pool: bool = False,
) -> torch.Tensor:
    """BatchNorm(sum_k gates[:, k] * conv2d(x, weight[k], bias[k])): the Block before its ReLU.

    BatchNorm follows F.batch_norm exactly: batch statistics when ``training`` (or when no running
    statistics are given), running statistics otherwise; running stats are updated in place with the
    unbiased batch variance. ``pool``: a 2x2 max-pool (``F.max_pool2d(z, 2)``) between the convolutions and
    BatchNorm, whose statistics are then those of the pooled map.
    """
    mixed = gated_conv_reference(x, gates, weight, bias, stride, padding)
    if pool:
        mixed = F.max_pool2d(mixed, 2)
    use_batch_stats = training or running_mean is None
    # F.batch_norm's CPU kernels mishandle strided [Cout] tensors (torch 2.14: wrong input gradients for a strided
    # weight or running_var; tests/test_regressions.py): they get contiguous copies, and strided running
    # statistics are updated through theirs.
    bn_weight, bn_bias, stats_mean, stats_var = (None if t is None else t.contiguous()
                                                 for t in (bn_weight, bn_bias, running_mean, running_var))
    normed = F.batch_norm(
        mixed, stats_mean, stats_var, bn_weight, bn_bias, training=use_batch_stats, momentum=momentum, eps=eps
    )
    for view, dense in ((running_mean, stats_mean), (running_var, stats_var)):
        if view is not None and dense is not view:
            view.copy_(dense)
    return normed


def mixed_conv_bn_relu_reference(x, gates, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                 training: bool, momentum: float, eps: float, stride: int,
                                 padding: tuple[int, int], activation: str = "relu",
                                 pool: bool = False) -> torch.Tensor:
    """ReLU(BatchNorm(sum_k gates[:, k] * conv2d(x, weight[k], bias[k]))): the fused op's ground truth (arguments
    as in ``mixed_conv_bn_reference``; ``activation="gelu"``: GELU instead of ReLU)."""
    return ACTIVATIONS[activation](mixed_conv_bn_reference(x, gates, weight, bias, bn_weight, bn_bias, running_mean,
                                                           running_var, training, momentum, eps, stride, padding,
                                                           pool))


def dynamic_conv_bn_relu(x, gates, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, momentum,
                         eps, stride, padding):
    """The public CondConv/DynamicConv formulation, a rival rather than ground truth: the K kernels mixed per
    sample with einsum, one grouped convolution (groups = N), then F.batch_norm and ReLU. Benchmarks and
    ``fastblock.doctor`` time it beside the fused backends."""
    n, cin, h, w = x.shape
    k, cout, _, kh, kw = weight.shape
    w_mix = torch.einsum("nk,koihw->noihw", gates, weight).reshape(n * cout, cin, kh, kw)
    b_mix = None if bias is None else (gates @ bias).reshape(-1)
    z = F.conv2d(x.reshape(1, n * cin, h, w), w_mix, b_mix, stride=stride, padding=padding, groups=n)
    z = z.reshape(n, cout, z.shape[-2], z.shape[-1])
    use_batch_stats = training or running_mean is None
    return F.relu(F.batch_norm(z, running_mean, running_var, bn_weight, bn_bias, use_batch_stats, momentum, eps))

