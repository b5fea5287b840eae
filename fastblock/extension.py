"""The C++/CUDA extension backend (``backend="extension"``, alias ``"cuda"``): csrc/ compiled into the torch ops
``fastblock_ext::forward`` / ``fastblock_ext::backward`` (C++ kernels for CPU tensors, CUDA kernels for GPU tensors).

Loading order: a prebuilt ``fastblock._C`` (``FASTBLOCK_BUILD_EXT=1 pip install -e .``), else a JIT build with
ninja through ``torch.utils.cpp_extension.load`` on first use, cached in ``TORCH_EXTENSIONS_DIR``. CUDA sources
are compiled when torch has CUDA, a GPU is visible and nvcc is found (``FASTBLOCK_EXT_CUDA=1``/``0`` forces it).
``FASTBLOCK_NO_EXT=1`` disables the extension. A failed build is reported by ``available_backends()`` with the
first lines of the compiler error, and ``auto`` falls back.

    python -m fastblock.extension --build               # build (or load) now and report
    python -m fastblock.extension --check-cuda-compile  # compile csrc/*.cu with nvcc for sm_80..sm_120, resource
                                                        # report, fail on spills (no GPU needed), then discard
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

from .backend_utils import (BackendStatus, empty_like_layout, fake_backward_outputs, fake_forward_outputs,
                            forced_schedule)
from .build_flags import (CHECKED_CUDA_ARCHS, CPU_SOURCES, CUDA_SOURCES, NVCC_FLAGS, cxx_flags, isa_level, link_flags,
                          openmp)


def _find_csrc(package_dir: Path) -> Path:
    """The C++/CUDA sources: the copy a wheel carries inside the package, else the checkout's csrc/ (editable)."""
    shipped = package_dir / "csrc"
    return shipped if (shipped / "fastblock_ops.cpp").exists() else package_dir.parent / "csrc"


CSRC = _find_csrc(Path(__file__).resolve().parent)


def _cpp_extension():
    """torch.utils.cpp_extension, imported without its "No CUDA runtime is found" warning where no CUDA build is
    wanted (a CPU-only machine with a CUDA toolkit installed would print it on every run)."""
    import logging

    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    if not torch.cuda.is_available():  # (not _want_cuda(): that finds nvcc through this module)
        logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def _nvcc() -> str | None:
    CUDA_HOME = _cpp_extension().CUDA_HOME

    found = shutil.which("nvcc")
    if found:
        return found
    if CUDA_HOME and Path(CUDA_HOME, "bin", "nvcc").exists():
        return str(Path(CUDA_HOME, "bin", "nvcc"))
    return None


def _want_cuda() -> bool:
    forced = os.environ.get("FASTBLOCK_EXT_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and torch.cuda.is_available() and _nvcc() is not None


def _first_lines(text: str, n: int = 6) -> str:
    lines = [ln for ln in text.strip().splitlines() if "error" in ln.lower()] or text.strip().splitlines()
    return " | ".join(ln.strip() for ln in lines[:n])[:800]


def _build_name(with_cuda: bool) -> str:
    # the CPU code's build options are part of the name: a shared build cache never loads another build's code
    return (("fastblock_ext_cuda" if with_cuda else "fastblock_ext_cpu") + f"_{isa_level().lower()}"
            + ("_omp" if openmp() else ""))


def build_needed() -> bool:
    """Whether the first use will compile the extension (no prebuilt fastblock._C, no cached JIT build): the
    trainer says so before the minute of silence that takes."""
    if load.cache_info().currsize or os.environ.get("FASTBLOCK_NO_EXT") == "1":
        return False
    import importlib.util

    if importlib.util.find_spec("fastblock._C") is not None:
        return False
    name = _build_name(_want_cuda())
    build_dir = Path(_cpp_extension()._get_build_directory(name, verbose=False))
    return not (build_dir / f"{name}.so").exists()


@functools.lru_cache(maxsize=None)
def load() -> tuple[bool, str]:
    """Load or build the extension once per process. Returns (ok, description or error)."""
    if os.environ.get("FASTBLOCK_NO_EXT") == "1":
        return False, "disabled by FASTBLOCK_NO_EXT=1"
    try:
        from . import _C  # noqa: F401  (prebuilt by setup.py)

        _register_fake()
        return True, "prebuilt fastblock._C"
    except ImportError:
        pass
    if not all((CSRC / s).exists() for s in CPU_SOURCES):
        return False, (f"sources not found in {CSRC} (install from a source checkout, or build with "
                       "FASTBLOCK_BUILD_EXT=1)")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return False, "no C++ compiler found (install g++), see README 'Environment variables'"
    try:
        import ninja  # noqa: F401
    except ImportError:
        if shutil.which("ninja") is None:
            return False, "ninja is not installed (pip install ninja)"
    cpp_extension = _cpp_extension()
    with_cuda = _want_cuda()
    sources = [str(CSRC / s) for s in CPU_SOURCES + (CUDA_SOURCES if with_cuda else [])]
    isa = isa_level()
    flags = cxx_flags(with_cuda)
    name = _build_name(with_cuda)
    try:
        import io
        from contextlib import redirect_stderr, redirect_stdout

        log = io.StringIO()
        with redirect_stdout(log), redirect_stderr(log):
            cpp_extension.load(name=name, sources=sources, extra_cflags=flags, extra_ldflags=link_flags(),
                               extra_cuda_cflags=NVCC_FLAGS if with_cuda else None,
                               with_cuda=with_cuda, is_python_module=False, verbose=False)
    except Exception as exc:  # compiler errors come back as RuntimeError / CalledProcessError
        detail = getattr(exc, "output", None) or str(exc)
        if isinstance(detail, bytes):
            detail = detail.decode(errors="replace")
        return False, f"extension failed to build: {_first_lines(detail)}"
    _register_fake()
    threads = "OpenMP" if openmp() else "one thread"
    return True, f"JIT-built {name} ({'C++ + CUDA' if with_cuda else 'C++ only'}, CPU code for {isa}, {threads})"


def _register_fake() -> None:
    """Fake kernels for the raw extension ops, so they also trace under torch.compile when called directly."""
    if getattr(_register_fake, "done", False):
        return
    @torch.library.register_fake("fastblock_ext::forward")
    def _fwd(x, gates, weight, bias, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, momentum, eps,
             stride, pad_h, pad_w, save_for_backward, activation=0, pool=False, schedule=-1):
        return fake_forward_outputs(x, weight, stride, pad_h, pad_w, save_for_backward,
                                    saved_z=fake_saved_z, pool=pool)

    @torch.library.register_fake("fastblock_ext::backward")
    def _bwd(dy, x, gates, weight, bias, bn_weight, bn_bias, z, mean, invstd, use_batch_stats, stride, pad_h, pad_w,
             activation=0, pool=False, schedule=-1, need_dx=True, need_dgates=True):
        return fake_backward_outputs(x, gates, weight, bias, bn_weight, bn_bias, need_dx, need_dgates)

    @torch.library.register_fake("fastblock_ext::max_pool2x2")
    def _pool(x, with_argmax):
        shape = (x.shape[0], x.shape[1], x.shape[2] // 2, x.shape[3] // 2)
        argmax = empty_like_layout(x, shape, torch.uint8) if with_argmax else x.new_empty((0,), dtype=torch.uint8)
        return empty_like_layout(x, shape), argmax

    @torch.library.register_fake("fastblock_ext::max_pool2x2_backward")
    def _pool_bwd(grad_out, argmax, height, width):
        return empty_like_layout(argmax, (*argmax.shape[:2], height, width), grad_out.dtype)

    _register_fake.done = True


def _has_cuda_kernels() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastblock_ext::forward", "CUDA")


def status(device_type: str) -> BackendStatus:
    ok, info = load()
    if not ok:
        return BackendStatus(False, info)
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return BackendStatus(False, "no CUDA device visible to torch")
        if not _has_cuda_kernels():
            return BackendStatus(False, f"{info}: built without CUDA kernels (nvcc not found or FASTBLOCK_EXT_CUDA=0)")
    return BackendStatus(True, info)


_SCHEDULE_CODES = {None: -1, "mix": 0, "concat": 1}  # the ops' `schedule` argument (csrc/fastblock.h)
_ACTIVATION_CODES = {"relu": 0, "gelu": 1}  # their `activation` argument (kActRelu, kActGelu)


def fake_saved_z(x, weight, shape) -> torch.Tensor:
    """What the forward saves for backward (csrc/fastblock_ops.cpp), for the fake kernels: z, NCHW on CUDA, laid
    out like x on CPU."""
    return x.new_empty(shape) if x.device.type == "cuda" else empty_like_layout(x, shape)


def forward(x, gates, weight, bias, bn_weight, bn_bias, running_mean, running_var,
            use_batch_stats, momentum, eps, stride, pad_h, pad_w, save_for_backward, activation="relu", pool=False):
    return torch.ops.fastblock_ext.forward(x, gates, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                           use_batch_stats, momentum, eps, stride, pad_h, pad_w, save_for_backward,
                                           _ACTIVATION_CODES[activation], pool, _SCHEDULE_CODES[forced_schedule()])


def backward(dy, x, gates, weight, bias, bn_weight, bn_bias, z, mean, invstd, use_batch_stats, stride, pad_h, pad_w,
             need_dx=True, need_dgates=True, activation="relu", pool=False):
    return torch.ops.fastblock_ext.backward(dy, x, gates, weight, bias, bn_weight, bn_bias, z, mean, invstd,
                                            use_batch_stats, stride, pad_h, pad_w, _ACTIVATION_CODES[activation],
                                            pool, _SCHEDULE_CODES[forced_schedule()], need_dx, need_dgates)


def max_pool2x2(x: torch.Tensor, with_argmax: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """2x2 / stride-2 max-pooling of a 4-d CPU tensor (csrc/max_pool_cpu.cpp): (output, the uint8 position 0..3 of
    each window's maximum, or an empty tensor without ``with_argmax``), laid out like x."""
    return torch.ops.fastblock_ext.max_pool2x2(x, with_argmax)


def max_pool2x2_backward(grad_out: torch.Tensor, argmax: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The input gradient [N, C, height, width]: each window's output gradient at its maximum, 0 elsewhere."""
    return torch.ops.fastblock_ext.max_pool2x2_backward(grad_out, argmax, height, width)


def _loaded_ops():
    ok, info = load()
    if not ok:
        raise RuntimeError(f"fastblock: the extension is not available: {info}")
    return torch.ops.fastblock_ext


def cpu_pool_stats() -> dict[str, int]:
    """The extension's opt-in CPU allocation pool (csrc/cpu_pool.cpp; off unless switched on): ``cached_bytes``
    (freed blocks held), ``live_blocks`` (pooled blocks in use), ``hits`` / ``misses`` (requests served from / not
    found in the cache), ``limit_bytes`` and ``tracked_sizes`` (block sizes whose last request it remembers, to
    evict the sizes asked for longest ago first; all 0 while it is off)."""
    keys = ("cached_bytes", "live_blocks", "hits", "misses", "limit_bytes", "tracked_sizes")
    return dict(zip(keys, _loaded_ops().cpu_pool_stats(), strict=True))


def cpu_threads() -> int:
    """How many threads the extension's CPU kernels run their parallel loops on (torch's thread count when the
    extension was built with OpenMP, else 1)."""
    return int(_loaded_ops().cpu_threads())


def cpu_pool_empty_cache() -> None:
    """Return the pool's cached blocks to the system (blocks in use are not affected), like
    ``torch.cuda.empty_cache()``."""
    _loaded_ops().cpu_pool_empty_cache()


def set_cpu_pool_limit(nbytes: int) -> None:
    """Cap the pool's cache at ``nbytes``; the first call with ``nbytes > 0`` switches the pool on, which installs
    it as the process's CPU allocator (it then serves only the op's calls and forwards everything else); 0 makes
    it pool nothing. ``FASTBLOCK_EXT_POOL_BYTES=<bytes>`` does the same at the first op call."""
    _loaded_ops().cpu_pool_set_limit(int(nbytes))


@contextlib.contextmanager
def cpu_pool_scope():
    """While switched on (``set_cpu_pool_limit``), the pool also serves every CPU allocation of 64 KiB and more
    that this thread makes inside the ``with`` block, not only the op's own: a CPU training step's autograd and
    pooling buffers then stop page-faulting in afresh each step. A no-op while the pool is off."""
    ops = _loaded_ops()
    ops.cpu_pool_enter()
    try:
        yield
    finally:
        ops.cpu_pool_exit()


def check_cuda_compile(archs=CHECKED_CUDA_ARCHS) -> int:
    """Compile every .cu source with nvcc as the real build does (torch's nvcc flags and defines, -O3) for each
    architecture in ``archs``, with ``ptxas -v``; print registers, stack and spills per kernel and architecture,
    and fail on a compile error or any spill (object files only; no GPU needed)."""
    cpp_extension = _cpp_extension()
    nvcc = _nvcc()
    if nvcc is None:
        print("nvcc not found: skipping the CUDA compile check")
        return 0
    includes = [f"-I{p}" for p in cpp_extension.include_paths(device_type="cuda")]
    includes.append(f"-I{sysconfig.get_paths()['include']}")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    aten_h = Path(torch.__file__).parent / "include" / "ATen" / "ATen.h"
    std = "c++20" if aten_h.exists() and "C++20" in aten_h.read_text() else "c++17"
    gencode = [f for arch in archs for f in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")]
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for src in CUDA_SOURCES:
            cmd = [nvcc, "-c", str(CSRC / src), "-o", str(Path(tmp) / (src + ".o")), f"-std={std}",
                   *cpp_extension.COMMON_NVCC_FLAGS, *NVCC_FLAGS, "-DTORCH_API_INCLUDE_EXTENSION_H",
                   "-DTORCH_EXTENSION_NAME=fastblock_ext", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-Xcompiler", "-fPIC",
                   "-Xptxas", "-v", *gencode, *includes]
            print(f"nvcc {src} for sm_{', sm_'.join(archs)} ...", flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout + proc.stderr, file=sys.stderr)
                print(f"CUDA compile check FAILED for {src}", file=sys.stderr)
                return 1
            table = parse_ptxas(proc.stdout + proc.stderr)
            for arch in archs:
                rows = table.get(f"sm_{arch}", [])
                spills = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
                print(f"  sm_{arch}: {len(rows)} kernels, registers <= {max((r['registers'] for r in rows), default=0)}"
                      f", stack <= {max((r['stack'] for r in rows), default=0)} B, {len(spills)} spilling")
                for r in spills:
                    print(f"    SPILL {r['kernel'][:80]}: {r['spill_stores']} B stores, {r['spill_loads']} B loads",
                          file=sys.stderr)
                failed |= bool(spills) or not rows
    print("CUDA compile check " + ("FAILED" if failed else "OK"))
    return 1 if failed else 0


def parse_ptxas(log: str) -> dict[str, list[dict]]:
    """ptxas -v output -> {"sm_90": [{kernel, registers, stack, spill_stores, spill_loads}, ...]}."""
    import re

    table: dict[str, list[dict]] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'", line)
        if m:
            current = {"kernel": m.group(1), "registers": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0}
            table.setdefault(m.group(2).rstrip("a"), []).append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
    return table


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastblock.extension", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", action="store_true", help="build (or load) the extension now and report")
    parser.add_argument("--check-cuda-compile", action="store_true",
                        help="compile the CUDA sources with nvcc against torch's headers (no GPU needed)")
    args = parser.parse_args(argv)
    rc = 0
    if args.build or not args.check_cuda_compile:
        ok, info = load()
        print(f"fastblock extension: {'OK' if ok else 'FAILED'}: {info}")
        rc |= 0 if ok else 1
    if args.check_cuda_compile:
        rc |= check_cuda_compile()
    return rc


if __name__ == "__main__":
    sys.exit(_main())
