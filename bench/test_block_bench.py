"""One Block op per provider, grouped by shape and mode; speed-ups are computed by bench/report.py from the JSON.

GPU: the CIFAR stage shapes N in {256, 512, 1024} x (C, HxW) in {(64,32), (128,16), (256,8), (512,4)} x K in
{1, 4, 6} in bf16 and fp32 (--full); the quick subset is N=512, K=4, bf16. CPU: N in {8, 32}, C=64, 16x16,
K=4, fp32.
"""
import pytest
import torch

from bench.providers import MODES, PROVIDERS, Shape, make_call, provider_status

GPU_STAGES = [(64, 32), (128, 16), (256, 8), (512, 4)]


def _cases(bench_mode: str, device: str):
    if bench_mode == "smoke":
        return [(Shape(4, 8, 8, 2), torch.float32)]
    if device == "cpu":
        return [(Shape(n, 64, 16, 4), torch.float32) for n in (8, 32)]
    if bench_mode == "quick":
        return [(Shape(512, c, hw, 4), torch.bfloat16) for c, hw in GPU_STAGES]
    return [(Shape(n, c, hw, k), dt) for dt in (torch.bfloat16, torch.float32) for n in (256, 512, 1024)
            for c, hw in GPU_STAGES for k in (1, 4, 6)]


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    bench_mode = "smoke" if config.getoption("--smoke") else ("full" if config.getoption("--full") else "quick")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = _cases(bench_mode, device)
    providers = [p for p in PROVIDERS if not (bench_mode == "smoke" and p == "compiled")]
    params = [(shape, dtype, mode, provider) for shape, dtype in cases for mode in MODES for provider in providers]
    ids = [f"{mode}-{shape}-{str(dtype).replace('torch.', '')}-{provider}" for shape, dtype, mode, provider in params]
    metafunc.parametrize("case", params, ids=ids)


def test_block_op(benchmark, case, device, bench_mode, peaks):
    shape, dtype, mode, provider = case
    ok, why = provider_status(provider, device)
    if not ok:
        pytest.skip(f"{provider}: {why}")
    dname = str(dtype).replace("torch.", "")
    benchmark.group = f"{mode} {shape} {dname}"
    copies = 3 if device == "cuda" else 1  # rotate inputs larger than L2 on GPUs
    call = make_call(provider, shape, mode, dtype, device, copies=copies)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rounds, warmup = {"smoke": (1, 1), "quick": (10 if device == "cpu" else 30, 3),
                      "full": (10 if device == "cpu" else 50, 5)}[bench_mode]
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=warmup, iterations=1)
    benchmark.extra_info.update({
        "provider": provider, "mode": mode, "shape": str(shape), "dtype": dname, "device": device,
        "flops": shape.flops(mode), "bytes": shape.bytes(mode, torch.finfo(dtype).bits // 8),
        "peak_mem_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None, **peaks,
    })
