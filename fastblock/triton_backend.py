"""Triton backend: the fused Block in Triton kernels (see fastblock/triton_kernels/)."""
from __future__ import annotations

import os

from .backends import BackendStatus


def status(device_type: str) -> BackendStatus:
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return BackendStatus(False, f"triton is not importable ({type(exc).__name__}: {exc})")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device_type == "cuda":
        import torch

        if not torch.cuda.is_available():
            return BackendStatus(False, "triton needs a CUDA device and torch sees none")
    elif not interpret:
        return BackendStatus(False, "triton needs a CUDA device (CPU tensors run only under TRITON_INTERPRET=1)")
    return BackendStatus(False, "Triton kernels not implemented yet")
