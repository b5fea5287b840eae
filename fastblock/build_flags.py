"""Compiler flags for the C++ extension, shared by the JIT build (fastblock/extension.py) and setup.py (which loads
this file by path, so it must only import os and torch)."""
from __future__ import annotations

import os

import torch

# The build compiles on the machine that runs it, so on x86 CPUs with AVX2 (ATen's "AVX2" and "AVX512"
# dispatch levels, as torch reports them) it targets AVX2 + FMA: the CPU kernels run 1.5-2x faster than on
# baseline x86-64 (SSE2). Not AVX-512: the kernels' reductions use 8 lanes, and gcc vectorises those with 512-bit
# registers plus a permute per step, which measured 3x slower than 256-bit. The level is part of the build's name,
# so a build cache shared between machines never loads code for the wrong CPU. FASTBLOCK_EXT_ISA=DEFAULT forces a
# portable build (about 15% slower fwd+bwd at the CIFAR shapes: ATen's generic Vectorized compiles to scalar code).
ISA_FLAGS = {"AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]}


def isa_level() -> str:
    forced = os.environ.get("FASTBLOCK_EXT_ISA", "").upper()
    if forced:
        return forced if forced in ISA_FLAGS else "DEFAULT"
    try:
        level = torch.backends.cpu.get_cpu_capability()
    except Exception:  # very old torch: stay portable
        return "DEFAULT"
    return "AVX2" if level in ("AVX2", "AVX512") else "DEFAULT"
