"""Pure-PyTorch reference of the fused Block op: the ground truth every other backend is tested against.

It is deliberately the literal coursework formulation -- K separate convolutions, a gate-weighted sum,
BatchNorm, ReLU -- and autograd provides its backward. Keep it obvious; do not optimise it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def gated_conv_reference(x: torch.Tensor, gates: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         stride: int, padding: tuple[int, int]) -> torch.Tensor:
    """sum_k gates[:, k] * conv2d(x, weight[k], bias[k]): the pre-BatchNorm activation z."""
    mixed = None
    for k in range(weight.shape[0]):
        branch = F.conv2d(x, weight[k], None if bias is None else bias[k], stride=stride, padding=padding)
        term = gates[:, k].view(-1, 1, 1, 1) * branch
        mixed = term if mixed is None else mixed + term
    return mixed


def mixed_conv_bn_relu_reference(
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
) -> torch.Tensor:
    """ReLU(BatchNorm(sum_k gates[:, k] * conv2d(x, weight[k], bias[k]))).

    BatchNorm follows F.batch_norm exactly: batch statistics when ``training`` (or when no running
    statistics are given), running statistics otherwise; running stats are updated in place with the
    unbiased batch variance.
    """
    mixed = gated_conv_reference(x, gates, weight, bias, stride, padding)
    use_batch_stats = training or running_mean is None
    normed = F.batch_norm(
        mixed, running_mean, running_var, bn_weight, bn_bias, training=use_batch_stats, momentum=momentum, eps=eps
    )
    return F.relu(normed)
