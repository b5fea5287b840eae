import os
import sys

# Every buffer a backend allocates starts as NaN in tests: an element a kernel forgot to write cannot pass.
os.environ.setdefault("FASTBLOCK_POISON", "1")

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
