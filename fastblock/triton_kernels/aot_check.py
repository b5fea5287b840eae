"""Compile every Triton kernel ahead of time for a GPU target, without a GPU.

The CPU interpreter checks the kernels' arithmetic but not what the real compiler accepts (layouts, dot shapes,
dtype rules, register limits). This compiles each kernel with the specialisations the launcher uses on GPUs --
every dtype, both schedules, train/eval, channels_last, and the hand-picked tile configs -- to PTX and cubin.

    python -m fastblock.triton_kernels.aot_check [--arch 90] [--quick]    (CI runs --quick, about 4 minutes)

Must run without TRITON_INTERPRET=1 (the interpreter replaces the kernels).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

DATA_ARGS = {"x_ptr", "gates_ptr", "w_ptr", "b_ptr", "out_ptr", "z_ptr", "dz_ptr", "wt_ptr", "dx_ptr", "y_ptr", "dy_ptr"}
FLOAT_ARGS = {"eps", "momentum", "inv_count"}
TRITON_TYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def _signature(kernel, data_dtype: torch.dtype, constexprs: dict) -> dict:
    acc = "fp64" if data_dtype == torch.float64 else "fp32"
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + (TRITON_TYPE[data_dtype] if name in DATA_ARGS else acc)
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _specialisations(quick: bool = False):
    """(kernel, data dtype, constexprs, compile options) for everything the launcher can run on a GPU.
    ``quick``: every kernel and dtype, but one per-sample-mixing and one concatenation tile config."""
    import triton.language as tl

    from . import batchnorm, configs, conv

    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    for dtype in dtypes:
        acc = tl.float64 if dtype == torch.float64 else tl.float32
        stages = ((256, 128), (16, 512)) if quick else ((1024, 64), (256, 128), (64, 256), (16, 512))
        for p, c in stages:  # the CIFAR stages (P = output pixels, C = channels)
            cfg = configs.conv_config(p, c, dtype, interp=False)
            common = dict(KH=3, KW=3, NUM_CONVS=4, MIX=cfg["MIX"], ACC_DTYPE=acc, DOT_PRECISION="ieee",
                          BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"])
            opts = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
            for eval_mode, store_z in ((False, False), (True, True), (True, False)):
                yield conv.mixed_conv_fwd_kernel, dtype, dict(common, EVAL=eval_mode, STORE_Z=store_z), opts
            yield conv.mixed_conv_dx_kernel, dtype, common, opts
        for k_pad in ((4,) if quick else (1, 4, 8)):
            dw = configs.dweight_config(k_pad, dtype, interp=False)
            yield (conv.mixed_conv_dweight_kernel, dtype,
                   dict(KH=3, KW=3, NUM_CONVS=k_pad, K_PAD=k_pad, ACC_DTYPE=acc, DOT_PRECISION="ieee",
                        BLOCK_M=dw["BLOCK_M"], BLOCK_N=dw["BLOCK_N"], BLOCK_P=dw["BLOCK_P"]),
                   dict(num_warps=dw["num_warps"]))
        for update in (True, False):
            yield batchnorm.bn_stats_finalize_kernel, dtype, dict(UPDATE=update, ACC_DTYPE=acc, **configs.FINALIZE), {}
        for cl in (False, True):
            yield batchnorm.bn_relu_normalize_kernel, dtype, dict(CHANNELS_LAST=cl, ACC_DTYPE=acc,
                                                                  BLOCK=configs.ELEMENTWISE_BLOCK), {}
            for batch_stats in (True, False):
                yield batchnorm.bn_relu_bwd_dz_kernel, dtype, dict(BATCH_STATS=batch_stats, CHANNELS_LAST=cl,
                                                                   ACC_DTYPE=acc, BLOCK=configs.ELEMENTWISE_BLOCK), {}
        block_r, block_c = configs.bn_reduce_tile(interp=False)
        yield batchnorm.bn_relu_bwd_reduce_kernel, dtype, dict(ACC_DTYPE=acc, BLOCK_R=block_r, BLOCK_C=block_c), {}
        yield batchnorm.sum_rows_kernel, dtype, dict(ACC_DTYPE=acc, **configs.FINALIZE), {}
    # TF32 is opt-in for fp32 (FASTBLOCK_ALLOW_TF32=1)
    cfg = configs.conv_config(256, 128, torch.float32, interp=False)
    yield conv.mixed_conv_fwd_kernel, torch.float32, dict(
        KH=3, KW=3, NUM_CONVS=4, MIX=True, ACC_DTYPE=tl.float32, DOT_PRECISION="tf32", BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], EVAL=False, STORE_Z=False), {}


def compile_all(arch: int = 90, verbose: bool = True, quick: bool = False) -> list[str]:
    """Compile every specialisation; return the failures (empty when all compile)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET to compile the kernels for a GPU target")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    failures, count = [], 0
    for kernel, dtype, constexprs, opts in _specialisations(quick):
        label = f"{kernel.fn.__name__}[{str(dtype).replace('torch.', '')}, " + ", ".join(
            f"{k}={getattr(v, 'name', v)}" for k, v in constexprs.items()) + "]"
        try:
            src = ASTSource(fn=kernel, signature=_signature(kernel, dtype, constexprs), constexprs=constexprs)
            compiled = triton.compile(src, target=target, options=opts)
            assert "cubin" in compiled.asm, "no cubin produced"
            count += 1
        except Exception as exc:  # report every failure, not just the first
            failures.append(f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            if verbose:
                print("FAILED", failures[-1], flush=True)
    if verbose:
        print(f"compiled {count} kernel specialisations for sm_{arch}; {len(failures)} failed")
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastblock.triton_kernels.aot_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for Hopper")
    parser.add_argument("--quick", action="store_true", help="one mixing and one concatenation config per dtype")
    args = parser.parse_args(argv)
    return 1 if compile_all(args.arch, quick=args.quick) else 0


if __name__ == "__main__":
    sys.exit(main())
