import os
import sys

# The Triton kernels run on CPU through the interpreter; it must be switched on before triton compiles
# (decorates) any kernel, i.e. before fastblock is imported. On a CUDA machine the real compiler is used.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py

import pytest  # noqa: E402
import torch  # noqa: E402

# Every uninitialised tensor (torch.empty, and at::empty inside the extension) starts as NaN in tests, so an
# element a kernel forgot to write cannot pass. warn_only: CUDA ops without a deterministic implementation
# still run.
torch.use_deterministic_algorithms(True, warn_only=True)
torch.utils.deterministic.fill_uninitialized_memory = True
# float32 means float32 in the tests: the reference's and the extension's cuDNN convolutions would otherwise use
# TF32 on GPUs (PyTorch's default for convolutions).
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture(params=["mix", "concat"])
def schedule(request):
    """A fused backend's test, run with each of its exact schedules: per-sample kernel mixing and the K-fold
    concatenation (a test that takes this fixture runs twice)."""
    import fastblock  # (after TRITON_INTERPRET is set above)

    with fastblock.force_schedule(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _fresh_seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_runtest_logreport(report):
    """FASTBLOCK_TEST_FAILURES_NOW=1: print each failure's details the moment it happens, not at the end of the
    session -- a time-boxed run (bench/gpu_verify.sh) that is cut off keeps them."""
    if report.failed and os.environ.get("FASTBLOCK_TEST_FAILURES_NOW") == "1":
        print(f"\n--- FAILED {report.nodeid} ({report.when}):\n{report.longreprtext[-4000:]}\n---", flush=True)
