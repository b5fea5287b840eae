"""fastblock: fused kernels for the gated multi-convolution Block.

    y = ReLU(BatchNorm(sum_k gates[:, k] * conv2d(x, weight[k], bias[k])))

Backends: "triton" (fused Triton kernels), "cuda" (C++/CUDA extension in csrc/), "reference" (pure PyTorch).
"""
from .backends import BACKENDS, BackendStatus, available_backends, resolve_backend
from .modules import Block
from .ops import mixed_conv_bn_relu
from .reference import mixed_conv_bn_relu_reference

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendStatus",
    "Block",
    "available_backends",
    "mixed_conv_bn_relu",
    "mixed_conv_bn_relu_reference",
    "resolve_backend",
]
