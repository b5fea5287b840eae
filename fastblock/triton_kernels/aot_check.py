"""Compile the Triton kernels exactly as the launcher launches them, for the GPUs users have, without a GPU, and
check what a real GPU would reject.

The CPU interpreter the tests use checks the kernels' arithmetic, not what the real compiler and the hardware
accept. Here ``fastblock.triton_backend.forward/backward`` run at the CIFAR stage shapes (N=512, (C, HxW) in
(64, 32x32), (128, 16x16), (256, 8x8), (512, 4x4), K=4, train and eval) with every kernel launch recorded instead of
run; each distinct launch is then specialised as Triton's JIT specialises it (integer arguments equal to 1,
16-byte divisibility of pointers and integers, the launcher's own num_warps / num_stages) and compiled with
Triton's real compiler for each architecture. From the artefacts it reads shared memory, tensor memory,
registers, stack and spills (``ptxas -v``) and the MMA instructions, and it fails on:
  * shared memory above the architecture's per-block limit, tensor memory above 512 columns (sm_100);
  * a 16-bit convolution kernel without tensor-core MMA instructions (mma.sync / wgmma / tcgen05);
  * a kernel whose body is only a trap; a spill in a 16-bit kernel (float32 spills are reported: the slow path).

    python -m fastblock.triton_kernels.aot_check                        # sm_80 86 89 90 100 120, bf16 + fp32
    python -m fastblock.triton_kernels.aot_check --arch 90 --dtypes bf16 fp16 fp32 --markdown

Must run without TRITON_INTERPRET=1 (the interpreter replaces the kernels). Uses Triton's JIT internals
(``create_function_from_signature``, ``JITFunction._pack_args``): written against Triton 3.8, also run with 3.6.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import re
import sys
import types
from dataclasses import dataclass, field

import torch

ARCHS = (80, 86, 89, 90, 100, 120)
STAGES = ((64, 32), (128, 16), (256, 8), (512, 4))  # (channels, map size) of the CIFAR networks' stages
BATCH = 512
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
# largest shared memory one block may use (opt-in), bytes
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
TMEM_COLUMNS = 512
MMA_PATTERN = re.compile(r"\b(mma\.sync|wgmma\.mma_async|tcgen05\.mma)")
CONV_KERNELS = ("mixed_conv_fwd_kernel", "mixed_conv_dx_kernel", "mixed_conv_dweight_kernel")


@dataclass
class Launch:
    kernel: object
    args: tuple
    kwargs: dict
    where: set = field(default_factory=set)  # "bf16 C128 16x16 fwd" ... (the launches this one stands for)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


def capture_launches(dtypes, stages=STAGES, batch=BATCH, arch=None) -> list[Launch]:
    """Every distinct kernel launch of the launcher at these shapes (train forward, eval forward with and without
    saving for backward, backward) on a GPU of compute capability ``arch``, recorded instead of run; with ReLU, and
    at the first stage also with GELU (its kernels differ only in the activation's few lines); each without and
    with the Block's 2x2 max-pool (``pool``)."""
    from .. import triton_backend as tb
    from . import batchnorm, configs, conv

    recorded: list[tuple[object, tuple, dict, str]] = []
    label = {"now": ""}

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                recorded.append((self.kernel, args, kwargs, label["now"]))
            return launch

    def recording(module):
        return types.SimpleNamespace(**{name: Recorder(getattr(module, name)) for name in dir(module)
                                        if name.endswith("_kernel")})

    fake = (recording(conv), recording(batchnorm), configs)
    saved_kernels, saved_interp, saved_arch = tb._kernels, tb._interpreting, tb._device_arch
    tb._kernels, tb._interpreting, tb._device_arch = (lambda: fake), (lambda t: False), (lambda t: arch)
    try:
        for dname, dtype in dtypes.items():
            for c, hw in stages:
                g = torch.Generator().manual_seed(0)
                x = torch.randn(batch, c, hw, hw, generator=g).to(dtype)
                gates = torch.softmax(torch.randn(batch, 4, generator=g), 1).to(dtype)
                weight = torch.randn(4, c, c, 3, 3, generator=g).to(dtype)
                bias = torch.zeros(4, c, dtype=dtype)
                bn_w, bn_b = torch.ones(c), torch.zeros(c)
                rm, rv = torch.zeros(c), torch.ones(c)
                activations = ("relu", "gelu") if (c, hw) == stages[0] else ("relu",)
                for activation, pool in itertools.product(activations, (False, True)):
                    act = ("" if activation == "relu" else f" {activation}") + (" pool" if pool else "")
                    for training, save in ((True, True), (False, True), (False, False)):
                        label["now"] = f"{dname} C{c} {hw}x{hw} {'train' if training else 'eval'} fwd{act}"
                        y, z, mean, invstd = tb.forward(x, gates, weight, bias, bn_w, bn_b, rm, rv, training, 0.1,
                                                        1e-5, 1, 1, 1, save, activation=activation, pool=pool)
                        if save and training:
                            label["now"] = f"{dname} C{c} {hw}x{hw} bwd{act}"
                            tb.backward(torch.empty_like(y), x, gates, weight, bias, bn_w, bn_b, z, mean, invstd,
                                        training, 1, 1, 1, activation=activation, pool=pool)
    finally:
        tb._kernels, tb._interpreting, tb._device_arch = saved_kernels, saved_interp, saved_arch
    # one entry per distinct specialisation (a key from the same inputs Triton's cache key uses)
    unique: dict[tuple, Launch] = {}
    for kernel, args, kwargs, where in recorded:
        key = (kernel.fn.__name__, _spec_key(args), tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        unique.setdefault(key, Launch(kernel, args, kwargs)).where.add(where)
    return list(unique.values())


def _spec_key(args) -> tuple:
    key = []
    for a in args:
        if isinstance(a, torch.Tensor):
            key.append((str(a.dtype), a.data_ptr() % 16 == 0))
        elif isinstance(a, bool) or not isinstance(a, int):
            key.append(type(a).__name__)
        else:
            key.append(("int", a == 1, a % 16 == 0, abs(a) >= 2 ** 31))
    return tuple(key)


def compile_like_jit(launch: Launch, arch: int):
    """Compile one recorded launch for ``arch`` the way Triton's JIT would on such a GPU; returns (compiled, ptxas
    log)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kernel = launch.kernel
    kwargs = dict(launch.kwargs)
    kwargs.setdefault("debug", False)
    if hasattr(knobs.compilation, "instrumentation_mode"):
        kwargs.setdefault("instrumentation_mode", knobs.compilation.instrumentation_mode)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    src = ASTSource(kernel, signature, constexprs, attrs)
    log = io.StringIO()
    previous = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # a cached kernel would skip ptxas and its report
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options=options.__dict__)
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = previous
    return compiled, log.getvalue()


def check(launch: Launch, arch: int, allow_spills: bool = False) -> dict:
    """Compile and check one launch for one architecture: a row of the resource table, with its problems."""
    from ..extension import parse_ptxas

    row = dict(kernel=launch.name, arch=arch, dtype=_data_dtype(launch), problems=[])
    try:
        compiled, log = compile_like_jit(launch, arch)
    except Exception as exc:
        chain, e = [], exc
        while e is not None:
            chain.append(f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
            e = e.__cause__ or e.__context__
        row["problems"].append("compile error: " + " <- ".join(chain))
        return row
    meta = compiled.metadata
    ptx = compiled.asm.get("ptx", "")
    kernels = [k for rows in parse_ptxas(log).values() for k in rows]
    regs = max((k["registers"] for k in kernels), default=0)
    stack = max((k["stack"] for k in kernels), default=0)
    spills = max((k["spill_stores"] for k in kernels), default=0)
    tmem = getattr(meta, "tmem_size", None) or 0
    row.update(shared=meta.shared, tmem=tmem, registers=regs, stack=stack, spill_stores=spills,
               warps=meta.num_warps, mma=bool(MMA_PATTERN.search(ptx)))
    if meta.shared > SHARED_LIMIT[arch]:
        row["problems"].append(f"shared memory {meta.shared} B > {SHARED_LIMIT[arch]} B")
    if tmem > TMEM_COLUMNS:
        row["problems"].append(f"tensor memory {tmem} columns > {TMEM_COLUMNS}")
    if not kernels:
        row["problems"].append("no ptxas report (nothing compiled?)")
    if "trap;" in ptx and not re.search(r"\b(ld|st)\.global", ptx):
        row["problems"].append("the body is only a trap")
    sixteen_bit = row["dtype"] in ("bf16", "fp16")
    if sixteen_bit and launch.name in CONV_KERNELS and launch.name != "mixed_conv_dweight_kernel" and not row["mma"]:
        row["problems"].append("16-bit convolution without tensor-core MMA instructions")
    if sixteen_bit and spills and not allow_spills:
        row["problems"].append(f"spills {spills} B in a 16-bit kernel")
    return row


def _data_dtype(launch: Launch) -> str:
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}
    for a in launch.args:
        if isinstance(a, torch.Tensor) and a.dtype in names:
            return names[a.dtype]
    return "?"


def run(archs, dtypes, verbose=True, allow_spills=False) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET to compile the kernels for a GPU target")
    rows = []
    for arch in archs:
        launches = capture_launches(dtypes, arch=arch)  # the launcher's tiles may depend on the architecture
        if verbose:
            print(f"sm_{arch}: {len(launches)} distinct launches at the CIFAR stage shapes ({', '.join(dtypes)})",
                  flush=True)
        for launch in launches:
            row = check(launch, arch, allow_spills)
            rows.append(row)
            if verbose and row["problems"]:
                print(f"  FAIL sm_{arch} {row['kernel']} [{row['dtype']}] ({'; '.join(sorted(launch.where))[:120]}): "
                      + "; ".join(row["problems"]), flush=True)
        if verbose:
            print("  " + summary_line([r for r in rows if r["arch"] == arch], arch), flush=True)
    return rows


def summary_line(rows: list[dict], arch: int) -> str:
    ok = [r for r in rows if "shared" in r]
    fp32_spills = sum(1 for r in ok if r["dtype"] == "fp32" and r["spill_stores"])
    return (f"sm_{arch}: {len(rows)} kernels, {sum(bool(r['problems']) for r in rows)} failing; shared <= "
            f"{max((r['shared'] for r in ok), default=0) // 1024} KiB of {SHARED_LIMIT[arch] // 1024}, "
            f"tensor memory <= {max((r['tmem'] for r in ok), default=0)} columns, registers <= "
            f"{max((r['registers'] for r in ok), default=0)}, 16-bit spills "
            f"{sum(1 for r in ok if r['dtype'] in ('bf16', 'fp16') and r['spill_stores'])}, fp32 kernels spilling "
            f"{fp32_spills}, fp64 kernels spilling {sum(1 for r in ok if r['dtype'] == 'fp64' and r['spill_stores'])}")


def markdown(rows: list[dict], archs) -> str:
    lines = ["| arch | kernels | failing | max shared KiB (limit) | max tensor-memory columns | max registers | "
             "16-bit kernels spilling | fp32 kernels spilling (max stack B) | 16-bit conv kernels with MMA |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arch in archs:
        rs = [r for r in rows if r["arch"] == arch and "shared" in r]
        conv16 = [r for r in rs if r["dtype"] in ("bf16", "fp16") and r["kernel"] in CONV_KERNELS[:2]]
        fp32 = [r for r in rs if r["dtype"] == "fp32"]
        lines.append(
            f"| sm_{arch} | {sum(r['arch'] == arch for r in rows)} | "
            f"{sum(bool(r['problems']) for r in rows if r['arch'] == arch)} | "
            f"{max((r['shared'] for r in rs), default=0) / 1024:.0f} ({SHARED_LIMIT[arch] // 1024}) | "
            f"{max((r['tmem'] for r in rs), default=0)} | {max((r['registers'] for r in rs), default=0)} | "
            f"{sum(1 for r in rs if r['dtype'] in ('bf16', 'fp16') and r['spill_stores'])} | "
            f"{sum(1 for r in fp32 if r['spill_stores'])} ({max((r['stack'] for r in fp32), default=0)}) | "
            f"{sum(r['mma'] for r in conv16)}/{len(conv16)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastblock.triton_kernels.aot_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    parser.add_argument("--markdown", action="store_true", help="print the per-architecture table (RESULTS.md)")
    parser.add_argument("--allow-spills", action="store_true",
                        help="report spills in 16-bit kernels without failing (they are known at the 8x8 and 4x4 "
                             "stages: bench/RESULTS.md)")
    args = parser.parse_args(argv)
    rows = run(args.arch, {d: DTYPES[d] for d in args.dtypes}, allow_spills=args.allow_spills)
    if args.markdown:
        print(markdown(rows, args.arch))
    failing = [r for r in rows if r["problems"]]
    print(f"{len(rows)} compiled kernel checks; {len(failing)} failing")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
