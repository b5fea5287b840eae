"""Tile and launch settings of every Triton kernel: the one home the launcher (fastblock/triton_backend.py) and the
ahead-of-time compile check (aot_check.py) both read. Imports torch only, never triton.

Hand-picked per shape class rather than autotuned: the CIFAR shapes fall into four classes (32x32, 16x16, 8x8,
4x4 maps) and autotuning each layer at start-up would cost seconds per shape. Not tuned on a GPU yet.
"""
from __future__ import annotations

from typing import Optional

import torch

# the CPU interpreter (tests): tiny tiles, so tiny test shapes still span several tiles
INTERPRETER_TILE = 16

# the weight-gradient kernel splits the batch until its grid has about this many programs (4 per SM of a 128-SM GPU)
DWEIGHT_PROGRAMS = 512

# BatchNorm kernels: statistics finalize / row sums (tiles x channels), elementwise, backward reduction
FINALIZE = dict(BLOCK_T=64, BLOCK_C=32)
ELEMENTWISE_BLOCK = 1024


def bn_reduce_tile(interp: bool) -> tuple[int, int]:
    """(BLOCK_R rows, BLOCK_C channels) of bn_act_bwd_reduce_kernel."""
    return (INTERPRETER_TILE, INTERPRETER_TILE) if interp else (64, 64)


def pool_tile(interp: bool) -> tuple[int, int]:
    """(BLOCK_R pooled rows, BLOCK_C channels) of the pooling kernels, and of the backward reduction over a pooled
    map: each element has four 64-bit addresses in flight, and 64x64 tiles spilled registers in bf16 on sm_80/86
    (32x32 still did on sm_80, and the reduction's 64x64 at the pooled 2x2 maps on sm_120)."""
    return (INTERPRETER_TILE, INTERPRETER_TILE) if interp else (16, 32)


def conv_config(rows_per_sample: int, cols: int, dtype: torch.dtype, interp: bool,
                schedule: Optional[str] = None, arch: Optional[int] = None) -> dict:
    """Schedule and tiles of the implicit-GEMM forward / dx kernels (``rows_per_sample``: output pixels per
    sample; ``cols``: output channels). ``schedule`` forces "mix" or "concat" (tests); else:
    * per-sample mixing (MIX) when a sample fills a 64-row tile (P >= 64); below that (4x4 maps) the K-fold
      concatenation schedule shares every weight load across samples;
    * BLOCK_N follows Cout (64 or 128); BLOCK_K = 16, or 32 (64-byte rows) for 16-bit types on Hopper and for
      Blackwell's (sm_100) mixing kernels; fp64 (tests only) gets small tiles;
    * the 16-bit concatenation tiles are 128x64 (8 warps): 128x128 spilled on every architecture and needed 576
      tensor-memory columns of 512 on Blackwell; 64x64 on sm_86/89, where 128x64 still spilled; tiles of 64x128
      and up get 8 warps (4 spilled at the 8x8 stage); a 16-bit K step of 32 spilled elsewhere (``arch``:
      compute capability as 90, 100, ...).
    """
    mix = (rows_per_sample >= 64) if schedule is None else (schedule == "mix")
    if interp:
        t = INTERPRETER_TILE
        return dict(MIX=mix, BLOCK_M=t, BLOCK_N=t, BLOCK_K=t, num_warps=4, num_stages=1)
    if dtype == torch.float64:
        return dict(MIX=mix, BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=2)
    sixteen_bit = dtype in (torch.float16, torch.bfloat16)
    block_m = 128 if (mix and rows_per_sample >= 128) or (not mix) else 64
    block_n = 128 if cols >= 128 else 64
    # K step: 16, or 32 for 16-bit where it does not spill (the AOT check): Hopper, and Blackwell's mixing kernels
    wide_k = arch == 90 or (arch is not None and 100 <= arch < 120 and mix)
    block_k = 32 if sixteen_bit and wide_k else 16
    if sixteen_bit and not mix:
        block_n = 64
    num_warps = 8 if block_m * block_n >= 128 * 64 else 4
    if sixteen_bit and not mix and arch in (86, 89):
        block_m, num_warps = 64, 8  # 128x64 spilled there (the train forward, 36 B); this: 186 registers, none
    return dict(MIX=mix, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
                num_stages=3 if sixteen_bit else 2)


def dweight_config(k_pad: int, dtype: torch.dtype, interp: bool) -> dict:
    """Tiles of mixed_conv_dweight_kernel: K_PAD*BM*BN accumulators plus the K weight tiles live in registers,
    so the tiles shrink as K grows."""
    if interp:
        t = INTERPRETER_TILE
        return dict(BLOCK_M=t, BLOCK_N=t, BLOCK_P=t, num_warps=4)
    bm, bn = (64, 64) if k_pad <= 2 else (32, 64) if k_pad <= 4 else (32, 32)
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_P=32 if dtype in (torch.float16, torch.bfloat16) else 16,
                num_warps=8 if k_pad * bm * bn >= 4 * 32 * 64 else 4)
