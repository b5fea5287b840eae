"""fastblock: fused kernels for the gated multi-convolution Block.

    y = ReLU(BatchNorm(sum_k gates[:, k] * conv2d(x, weight[k], bias[k])))

Backends: "triton" (fused Triton kernels), "extension" (the C++/CUDA extension in csrc/; alias "cuda"),
"reference" (pure PyTorch). The contract and the registry: fastblock/backends.py.
"""
from .backend_utils import BackendStatus, force_schedule
from .backends import (Backend, available_backends, backend_names, get_backend, register_backend, resolve_backend,
                       unregister_backend)
from .modules import Block, MaxPool2x2
from .ops import max_pool2x2, mixed_conv_bn_relu
from .reference import mixed_conv_bn_relu_reference

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendStatus",
    "Block",
    "MaxPool2x2",
    "available_backends",
    "backend_names",
    "force_schedule",
    "get_backend",
    "max_pool2x2",
    "mixed_conv_bn_relu",
    "mixed_conv_bn_relu_reference",
    "register_backend",
    "resolve_backend",
    "unregister_backend",
]


def __getattr__(attr: str):
    if attr == "BACKENDS":  # the registered backends' names, always current
        return backend_names()
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
