"""``python -m fastblock.doctor``: what to run first on a new machine (a GPU machine above all).

It prints the versions (torch, triton, CUDA, driver, GPU and architecture), every backend's availability and why,
then checks every available fused backend against the float64 reference at the CIFAR stage shapes -- forward,
all six gradients and the running statistics, train and eval, in float32 and bfloat16 (on CPU: smaller batches,
float32) -- and times one fwd+bwd of the benchmark Block for every provider: the eager reference, torch.compile of
it (--compile), one convolution + BatchNorm + ReLU (the floor: what a K=1 Block costs), the dynamic-convolution
formulation, and each backend. Exit status 1 on any mismatch or failure.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from . import self_check
from .backends import available_backends, backend_names, device_from_text, get_backend
from .reference import dynamic_conv_bn_relu, mixed_conv_bn_relu_reference

GPU_STAGES = [(64, 32), (128, 16), (256, 8), (512, 4)]  # (channels, map size) of the CIFAR networks' stages
CPU_STAGES = [(32, 32), (64, 16), (128, 8), (128, 4)]


def versions() -> list[str]:
    lines = [f"python {platform.python_version()}, torch {torch.__version__}"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton: not installed")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        driver = ""
        try:
            import subprocess

            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except Exception:
            driver = "unknown"
        lines.append(f"CUDA {torch.version.cuda}, driver {driver}, {torch.cuda.device_count()} GPU(s); GPU 0: "
                     f"{props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
                     f"{props.total_memory / 2 ** 30:.0f} GiB")
    else:
        lines.append(f"no GPU visible (torch CUDA build: {torch.version.cuda or 'none'}); "
                     f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    return lines


def _fused(device: str) -> list[str]:
    report = available_backends(device)
    return [n for n in backend_names() if get_backend(n).fused and report[n].available
            and not (n == "triton" and device == "cpu")]


def correctness(device: str, quick: bool) -> list[tuple[str, str, bool, str]]:
    """(backend, case, passed, detail) for every fused backend at the stage shapes."""
    dev = torch.device(device)
    stages = GPU_STAGES if device == "cuda" else CPU_STAGES
    batch = 2 if quick else (16 if device == "cuda" else 4)
    dtypes = (torch.float32, torch.bfloat16) if device == "cuda" else (torch.float32,)
    results = []
    for name in _fused(device):
        module = get_backend(name).module()
        for c, hw in stages[:2] if quick else stages:
            for dtype in dtypes:
                for training in (True, False):
                    case = f"N{batch}-C{c}-{hw}x{hw}-K4 {str(dtype).replace('torch.', '')} " + \
                           ("train" if training else "eval")
                    try:
                        with self_check.exact_fp32():  # float32 is checked as exact float32, TF32 off
                            why = self_check.check_case(module, dev, dtype, training, n=batch, cin=c, cout=c, h=hw,
                                                        w=hw, k=4)
                    except Exception as exc:
                        why = f"raised {type(exc).__name__}: {exc}"
                    results.append((name, case, why is None, why or "matches the reference"))
    return results


def time_call(fn, reps: int, device: str, warmup: int = 2, reduce=statistics.median) -> float:
    """Seconds per call of ``fn`` (``reduce`` over ``reps`` timed calls, after ``warmup`` untimed ones); on CUDA
    each timing waits for the GPU's work, not just the launch."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return reduce(times)


def speed(device: str, quick: bool, compile_reference: bool) -> list[tuple[str, float]]:
    """(provider, median ms) of one fwd+bwd at the benchmark Block: N=512 C=128 16x16 K=4 bf16 on a GPU, N=32
    C=64 16x16 K=4 float32 on CPU (N=8 with --quick)."""
    if device == "cuda":
        n, c, hw, dtype, reps = 512, 128, 16, torch.bfloat16, 20
    else:
        n, c, hw, dtype, reps = (8 if quick else 32), 64, 16, torch.float32, (3 if quick else 10)
    k, dev = 4, torch.device(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, hw, hw, generator=g).to(dev, dtype).requires_grad_(True)
    gates = torch.softmax(torch.randn(n, k, generator=g), 1).to(dev, dtype).requires_grad_(True)
    weight = (torch.randn(k, c, c, 3, 3, generator=g) * (9 * c) ** -0.5).to(dev, dtype).requires_grad_(True)
    bias = torch.zeros(k, c, device=dev, dtype=dtype, requires_grad=True)
    bn_w = torch.ones(c, device=dev, requires_grad=True)
    bn_b = torch.zeros(c, device=dev, requires_grad=True)
    rm, rv = torch.zeros(c, device=dev), torch.ones(c, device=dev)
    conv_w = weight[0].detach().clone().requires_grad_(True)
    import fastblock

    def step(op):
        def run():
            y = op()
            y.backward(torch.ones_like(y))
        return run

    providers = {
        "reference (eager)": lambda: mixed_conv_bn_relu_reference(x, gates, weight, bias, bn_w, bn_b, rm, rv, True,
                                                                  0.1, 1e-5, 1, (1, 1)),
        # BatchNorm parameters and statistics in float32 with 16-bit data, as under autocast
        "conv+BN+ReLU (floor)": lambda: F.relu(F.batch_norm(F.conv2d(x, conv_w, padding=1), rm, rv, bn_w, bn_b, True,
                                                            0.1, 1e-5)),
        "dynamic conv": lambda: dynamic_conv_bn_relu(x, gates, weight, bias, bn_w, bn_b, rm, rv, True, 0.1, 1e-5, 1, 1),
    }
    if compile_reference:
        compiled = torch.compile(mixed_conv_bn_relu_reference)
        providers["reference (torch.compile)"] = lambda: compiled(x, gates, weight, bias, bn_w, bn_b, rm, rv, True,
                                                                  0.1, 1e-5, 1, (1, 1))
    for name in _fused(device):
        providers[name] = (lambda name=name: fastblock.mixed_conv_bn_relu(x, gates, weight, bias, bn_w, bn_b, rm, rv,
                                                                         backend=name))
    label = f"fwd+bwd N{n}-C{c}-{hw}x{hw}-K{k} {str(dtype).replace('torch.', '')}"
    return label, [(name, 1e3 * time_call(step(op), reps, device)) for name, op in providers.items()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastblock.doctor", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="fewer shapes, a smaller speed case (CI smoke run)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the reference")
    args = ap.parse_args(argv)
    try:
        device_from_text(args.device)
    except ValueError as exc:
        ap.error(f"argument --device: {exc}")
    print("== versions")
    for line in versions():
        print("  " + line)
    print(f"== backends on {args.device}")
    for name, status in available_backends(args.device).items():
        print(f"  {name:10s} {status}")
    print(f"== correctness against the float64 reference ({args.device})")
    results = correctness(args.device, args.quick)
    for name, case, ok, detail in results:
        print(f"  {'ok  ' if ok else 'FAIL'} {name:10s} {case:34s} {detail}")
    if not results:
        print("  (no fused backend available here)")
    print(f"== speed ({args.device}; medians)")
    label, rows = speed(args.device, args.quick, args.compile)
    ref_ms = rows[0][1]
    print(f"  {label}")
    for name, ms in rows:
        print(f"  {name:28s} {ms:9.2f} ms   {ref_ms / ms:5.2f}x the eager reference")
    failed = [r for r in results if not r[2]]
    print(f"== {'FAILED: ' + str(len(failed)) + ' mismatch(es)' if failed else 'all checks passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
