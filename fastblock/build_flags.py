"""Sources and compiler flags of the C++/CUDA extension, shared by the JIT build (fastblock/extension.py) and
setup.py's ahead-of-time build (which loads this file by path, so it must only import os, sys and torch)."""
from __future__ import annotations

import os
import sys

import torch

CPU_SOURCES = ["fastblock_ops.cpp", "fastblock_cpu.cpp", "cpu_pool.cpp", "max_pool_cpu.cpp"]  # in csrc/
CUDA_SOURCES = ["fastblock_cuda.cu"]
NVCC_FLAGS = ["-O3", "-DFASTBLOCK_WITH_CUDA"]
# GPU architectures the CUDA compile check builds for (A100, RTX 30xx, RTX 40xx/L4, H100/H200, B200, RTX 50xx);
# a real build targets the GPU it runs on (or TORCH_CUDA_ARCH_LIST).
CHECKED_CUDA_ARCHS = ("80", "86", "89", "90", "100", "120")

# Built on the machine that runs it: AVX2 + FMA where torch reports an AVX2/AVX512 CPU (not AVX-512: the
# kernels' 8-lane reductions vectorise worse with 512-bit registers; measurements in bench/RESULTS.md). The level is
# part of the build's name, so a shared build cache never loads code for the wrong CPU. FASTBLOCK_EXT_ISA=DEFAULT
# forces a portable build.
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


def openmp() -> bool:
    """Whether to compile with OpenMP: at::parallel_for is a header template that runs its loop on one thread
    unless the extension itself is compiled with -fopenmp (torch's own build setting does not carry over). On when
    torch's ATen uses OpenMP and the compiler is GCC-compatible on Linux; the extension then shares torch's loaded
    OpenMP runtime (same soname) and its thread count. FASTBLOCK_EXT_OPENMP=0 turns it off."""
    if os.environ.get("FASTBLOCK_EXT_OPENMP", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        return bool(torch.backends.openmp.is_available())
    except Exception:
        return False


def cxx_flags(with_cuda: bool) -> list[str]:
    """Host compiler flags; the C++ standard is left to torch (C++17 up to torch 2.9, C++20 after)."""
    return ["-O3", *ISA_FLAGS.get(isa_level(), []), *(["-fopenmp"] if openmp() else []),
            *(["-DFASTBLOCK_WITH_CUDA"] if with_cuda else [])]


def link_flags() -> list[str]:
    return ["-fopenmp"] if openmp() else []
