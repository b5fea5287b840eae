"""``fastblock.Block``: the gated multi-convolution block as an nn.Module.

    a = g(Linear(SpatialAvgPool(x)))                        # [N, K] per-sample gates
    y = ReLU(BatchNorm(sum_k a[:, k] * conv_k(x)))          # one fused op
    y = ReLU(BatchNorm(MaxPool2x2(sum_k a[:, k] * conv_k(x))))   # Block(..., pool=True)

The state_dict is the same whichever backend is active: switching is ``block.backend = "triton"``.
"""
from __future__ import annotations

from typing import Sequence, Union

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backends import accepted_names
from .ops import ACTIVATIONS, autocast_enabled, max_pool2x2, mixed_conv_bn_relu

GATES = ("softmax", "sigmoid", "relu", "none")


def _checked_backend(value: str) -> str:
    """A module's ``backend`` setting: "auto" or a backend name or alias, else ValueError."""
    if value not in accepted_names():
        raise ValueError(f"backend must be one of {accepted_names()}, got {value!r}")
    return value


class Block(nn.Module):
    """Gated sum of K convolutions, then BatchNorm and ReLU (or GELU), computed by one fused op.

    Args:
        in_channels, out_channels: Cin, Cout.
        num_convs: K, the number of parallel convolutions.
        kernel_size: odd int for all branches, or a sequence of K odd ints (mixed sizes, e.g. [5, 5, 3, 3]);
            smaller kernels are zero-embedded (centred) in the largest one and kept zero during training.
        stride: 1 or more.
        gate: "softmax" (default), "sigmoid", "relu", or "none" (all gates fixed to 1, no gate layer).
        temperature: softmax temperature (logits / temperature).
        gate_hidden: hidden sizes of an MLP gate (e.g. (512, 512)); empty for a single Linear.
        bias: whether the K convolutions have biases.
        momentum, eps, track_running_stats: as in nn.BatchNorm2d.
        activation: "relu" (default) or "gelu" (exact, as ``nn.GELU()``), after BatchNorm.
        pool: a 2x2 max-pool (``nn.MaxPool2d(2)``) between the convolutions and BatchNorm, inside the fused op:
            BatchNorm and the activation run on a quarter of the pixels (the public speed-runs' conv -> pool -> BN
            -> activation order). The output is half the convolution's height and width (rounded down).
        backend: "auto", or a backend name or alias ("triton", "extension"/"cuda", "reference").
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_convs: int = 4,
        kernel_size: Union[int, Sequence[int]] = 3,
        stride: int = 1,
        gate: str = "softmax",
        temperature: float = 1.0,
        gate_hidden: Sequence[int] = (),
        bias: bool = True,
        momentum: float = 0.1,
        eps: float = 1e-5,
        track_running_stats: bool = True,
        activation: str = "relu",
        pool: bool = False,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels} and {out_channels}")
        if num_convs < 1:
            raise ValueError(f"num_convs must be >= 1, got {num_convs}")
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        sizes = [kernel_size] * num_convs if isinstance(kernel_size, int) else list(kernel_size)
        if len(sizes) != num_convs:
            raise ValueError(f"kernel_size lists {len(sizes)} sizes for num_convs={num_convs}")
        if any(s < 1 or s % 2 == 0 for s in sizes):
            raise ValueError(f"kernel sizes must be odd and >= 1 (for 'same' padding), got {sizes}")
        self.in_channels, self.out_channels, self.num_convs = in_channels, out_channels, num_convs
        self.kernel_sizes = tuple(sizes)
        self.stride, self.gate, self.temperature = stride, gate, float(temperature)
        self.activation = activation
        self.pool = bool(pool)
        self.backend = backend
        kmax = max(sizes)

        self.weight = nn.Parameter(torch.empty(num_convs, out_channels, in_channels, kmax, kmax, **factory))
        self.bias = nn.Parameter(torch.empty(num_convs, out_channels, **factory)) if bias else None
        if len(set(sizes)) > 1:
            mask = torch.zeros(num_convs, 1, 1, kmax, kmax, **factory)
            for k, s in enumerate(sizes):
                lo = (kmax - s) // 2
                mask[k, :, :, lo:lo + s, lo:lo + s] = 1
            self.register_buffer("kernel_mask", mask, persistent=False)
        else:
            self.kernel_mask = None

        if gate == "none":
            self.gate_layer = None
        else:
            layers, width = [], in_channels
            for hidden in gate_hidden:
                layers += [nn.Linear(width, hidden, **factory), nn.ReLU(inplace=True)]
                width = hidden
            layers.append(nn.Linear(width, num_convs, **factory))
            self.gate_layer = layers[0] if len(layers) == 1 else nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum,
                                 track_running_stats=track_running_stats, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Each branch is initialised like its own nn.Conv2d (kaiming_uniform(a=sqrt(5)), fan_in of its real size).
        with torch.no_grad():
            kmax = self.weight.shape[-1]
            for k, size in enumerate(self.kernel_sizes):
                fan_in = self.in_channels * size * size
                bound = 1.0 / math.sqrt(fan_in)  # what kaiming_uniform_(a=sqrt(5)) gives for a conv
                lo = (kmax - size) // 2
                self.weight[k].zero_()
                self.weight[k, :, :, lo:lo + size, lo:lo + size].uniform_(-bound, bound)
                if self.bias is not None:
                    self.bias[k].uniform_(-bound, bound)
        self.bn.reset_parameters()

    def _apply(self, fn, recurse=True):
        # nn.Module.to(memory_format=torch.channels_last) converts every 4-D and 5-D tensor with that format and
        # fails on 5-D ones; the [K, Cout, Cin, kh, kw] weight goes through its 4-D [K*Cout, Cin, kh, kw] view so
        # Blocks can sit inside any channels_last model. Device/dtype conversions are unaffected.
        def fn_5d_safe(t):
            if t.dim() == 5:
                return fn(t.flatten(0, 1)).unflatten(0, t.shape[:2])
            return fn(t)

        return super()._apply(fn_5d_safe, recurse)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = _checked_backend(value)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """The [N, K] per-sample gate a = g(Linear(SpatialAvgPool(x)))."""
        if self.gate_layer is None:
            return x.new_ones((x.shape[0], self.num_convs))
        logits = self.gate_layer(x.mean(dim=(2, 3)))
        if self.gate == "softmax":
            return F.softmax(logits / self.temperature, dim=1)
        if self.gate == "sigmoid":
            return torch.sigmoid(logits)
        return F.relu(logits)

    def effective_weight(self) -> torch.Tensor:
        # Multiplying by the mask keeps the zero-embedded taps of smaller kernels at exactly zero: their gradient is 0.
        return self.weight if self.kernel_mask is None else self.weight * self.kernel_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"Block expects input [N, {self.in_channels}, H, W], got {tuple(x.shape)}")
        gates = self.gates(x)
        bn = self.bn
        momentum = bn.momentum
        if self.training and bn.track_running_stats:
            bn.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative moving average, as nn.BatchNorm2d
                momentum = 1.0 / float(bn.num_batches_tracked)
        use_running = bn.track_running_stats
        return mixed_conv_bn_relu(
            x, gates.to(x.dtype) if not autocast_enabled(x.device.type) else gates,
            self.effective_weight(), self.bias, bn.weight, bn.bias,
            bn.running_mean if use_running else None, bn.running_var if use_running else None,
            training=self.training, momentum=momentum, eps=bn.eps, stride=self.stride, padding=None,
            backend=self.backend, activation=self.activation, pool=self.pool,
        )

    def extra_repr(self) -> str:
        sizes = self.kernel_sizes[0] if len(set(self.kernel_sizes)) == 1 else list(self.kernel_sizes)
        return (f"{self.in_channels}, {self.out_channels}, num_convs={self.num_convs}, kernel_size={sizes}, "
                f"stride={self.stride}, gate={self.gate!r}"
                + (f", temperature={self.temperature}" if self.gate == "softmax" and self.temperature != 1 else "")
                + (f", activation={self.activation!r}" if self.activation != "relu" else "")
                + (", pool=True" if self.pool else "")
                + f", backend={self.backend!r}")


class MaxPool2x2(nn.Module):
    """``nn.MaxPool2d(2)`` -- same outputs and gradients -- through ``fastblock.ops.max_pool2x2``: on CPU tensors the
    extension's kernel when ``backend`` ("auto", or a backend name as for ``Block``) resolves to the extension."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = _checked_backend(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool2x2(x, self.backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
