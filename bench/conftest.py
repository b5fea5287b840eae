"""pytest-benchmark configuration for `pytest bench/`.

    pytest bench/                     quick subset (a few minutes on CPU)
    pytest bench/ --full              the whole grid (GPU: N x (C, HxW) x K x dtype)
    pytest bench/ --smoke             one round per case, tiny shapes (used by tests/ so the suite cannot rot)
    pytest bench/ --benchmark-json out.json && python -m bench.report out.json
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", help="benchmark the full shape grid")
    parser.addoption("--smoke", action="store_true", help="one round on tiny shapes (CI smoke test)")


@pytest.fixture(scope="session")
def bench_mode(request):
    if request.config.getoption("--smoke"):
        return "smoke"
    return "full" if request.config.getoption("--full") else "quick"


@pytest.fixture(scope="session")
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def peaks(device, bench_mode):
    from bench.providers import measure_peaks

    return {"peak_tflops": None, "peak_gbs": None} if bench_mode == "smoke" else measure_peaks(device)


def pytest_benchmark_update_machine_info(config, machine_info):
    import fastblock

    machine_info["torch"] = torch.__version__
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except ImportError:
        machine_info["triton"] = None
    machine_info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    machine_info["threads"] = torch.get_num_threads()
    machine_info["fastblock_backends"] = {k: repr(v) for k, v in fastblock.available_backends().items()}
