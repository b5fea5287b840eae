"""What is timed: one Block-op call per provider, on identical inputs.

Providers
  reference   the eager pure-PyTorch reference (K convolutions, weighted sum, BatchNorm, ReLU)
  compiled    torch.compile of the reference (inductor)
  dynconv     the public CondConv/DynamicConv formulation: mix the K kernels per sample with einsum, one grouped
              convolution with groups=N, then F.batch_norm + ReLU -- the strongest plain-PyTorch rival
  <backend>   each fused fastblock backend of the registry (triton, extension, ...)
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F

import fastblock
from fastblock.doctor import time_call
from fastblock.reference import dynamic_conv_bn_relu, mixed_conv_bn_relu_reference

PROVIDERS = ("reference", "compiled", "dynconv",
             *(name for name in fastblock.backend_names() if fastblock.get_backend(name).fused))
MODES = ("fwd", "fwdbwd", "eval")


@dataclasses.dataclass(frozen=True)
class Shape:
    n: int
    c: int
    hw: int
    k: int
    ksize: int = 3

    def __str__(self) -> str:
        return f"N{self.n}-C{self.c}-{self.hw}x{self.hw}-K{self.k}"

    def flops(self, mode: str) -> float:
        """FLOPs of ONE aggregated convolution (what a fused kernel must at least do); x3 with backward."""
        fwd = 2.0 * self.n * self.hw * self.hw * self.c * self.c * self.ksize * self.ksize
        return 3 * fwd if mode == "fwdbwd" else fwd

    def bytes(self, mode: str, elem: int) -> float:
        """Reading the inputs and writing the outputs once (x, weights, y; plus dy, dx, dW with backward)."""
        act = self.n * self.c * self.hw * self.hw
        weights = self.k * self.c * self.c * self.ksize * self.ksize
        once = (2 * act + weights) * elem
        return 2 * once if mode == "fwdbwd" else once


dynconv = dynamic_conv_bn_relu


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    return torch.compile(mixed_conv_bn_relu_reference)


def provider_status(provider: str, device: str) -> tuple[bool, str]:
    if provider in ("reference", "dynconv"):
        return True, ""
    if provider == "compiled":
        return True, ""
    status = fastblock.available_backends(device)[provider]
    if provider == "triton" and device == "cpu":
        return False, "triton is benchmarked on GPUs only (the CPU interpreter is a test tool)"
    return status.available, status.reason


def make_call(provider: str, shape: Shape, mode: str, dtype: torch.dtype, device: str, copies: int = 1):
    """A zero-argument function running one step of ``mode`` for ``provider``; rotates between ``copies``
    input sets (so on a GPU the inputs of consecutive calls are not all sitting in L2)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    sets = []
    for _ in range(copies):
        x = torch.randn(shape.n, shape.c, shape.hw, shape.hw, generator=g).to(device, dtype)
        gates = torch.softmax(torch.randn(shape.n, shape.k, generator=g), 1).to(device, dtype)
        weight = (torch.randn(shape.k, shape.c, shape.c, shape.ksize, shape.ksize, generator=g)
                  * (shape.c * shape.ksize ** 2) ** -0.5).to(device, dtype)
        bias = torch.zeros(shape.k, shape.c, device=device, dtype=dtype)
        need_grad = mode == "fwdbwd"
        for t in (x, gates, weight, bias):
            t.requires_grad_(need_grad)
        sets.append((x, gates, weight, bias))
    bn_w = torch.ones(shape.c, device=device, requires_grad=mode == "fwdbwd")
    bn_b = torch.zeros(shape.c, device=device, requires_grad=mode == "fwdbwd")
    rm, rv = torch.zeros(shape.c, device=device), torch.ones(shape.c, device=device)
    training = mode != "eval"
    pad = shape.ksize // 2
    if provider == "reference":
        op = functools.partial(mixed_conv_bn_relu_reference, padding=(pad, pad))
    elif provider == "compiled":
        op = functools.partial(_compiled_reference(), padding=(pad, pad))
    elif provider == "dynconv":
        op = functools.partial(dynconv, padding=pad)
    else:
        op = functools.partial(fastblock.mixed_conv_bn_relu, backend=provider, padding=pad)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    state = {"i": 0}

    def call():
        x, gates, weight, bias = sets[state["i"] % copies]
        state["i"] += 1
        with torch.set_grad_enabled(mode == "fwdbwd"):
            y = op(x, gates, weight, bias, bn_w, bn_b, rm, rv, training=training, momentum=0.1, eps=1e-5, stride=1)
            if mode == "fwdbwd":
                y.backward(torch.ones_like(y))
        sync()  # time the work, not the launch

    return call


def measure_peaks(device: str) -> dict:
    """Measured (not datasheet) peaks of this device: a large bf16/fp32 matmul and a large copy."""
    def best(fn):  # a peak: the fastest of five calls after one warm-up
        return time_call(fn, 5, device, warmup=1, reduce=min)

    size = 8192 if device == "cuda" else 1024
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dt)
    b = torch.randn(size, size, device=device, dtype=dt)
    tflops = 2 * size ** 3 / best(lambda: a @ b) / 1e12
    src = torch.empty(int(2 ** 28 if device == "cuda" else 2 ** 25), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    gbs = 2 * src.numel() / best(lambda: dst.copy_(src)) / 1e9
    return {"peak_tflops": round(tflops, 2), "peak_tflops_dtype": str(dt).replace("torch.", ""),
            "peak_gbs": round(gbs, 1)}
