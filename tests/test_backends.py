"""Backend reporting and selection."""
import pytest
import torch

import fastblock
from fastblock.backends import resolve_backend
from helpers import Case, make_inputs


def test_available_backends_reports_every_backend_with_a_reason():
    report = fastblock.available_backends("cpu")
    assert set(report) == {"triton", "cuda", "reference"}
    for name, status in report.items():
        assert isinstance(status.available, bool) and status.reason, name
    assert report["reference"].available


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_no_gpu_reasons():
    import os

    report = fastblock.available_backends("cuda")
    assert not report["triton"].available and "CUDA" in report["triton"].reason
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert "CUDA" in fastblock.available_backends("cpu")["triton"].reason


def test_auto_on_cpu_prefers_extension_else_reference():
    ext = fastblock.available_backends("cpu")["cuda"].available
    assert resolve_backend("auto", "cpu") == ("cuda" if ext else "reference")


def test_env_var_overrides_auto(monkeypatch):
    monkeypatch.setenv("FASTBLOCK_BACKEND", "reference")
    assert resolve_backend("auto", "cpu") == "reference"
    monkeypatch.setenv("FASTBLOCK_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTBLOCK_BACKEND"):
        resolve_backend("auto", "cpu")


def test_explicit_unavailable_backend_raises_not_falls_back(monkeypatch):
    from fastblock import backends

    monkeypatch.setattr(backends, "backend_status",
                        lambda name, device=None: backends.BackendStatus(name == "reference", "broken on purpose"))
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on cpu tensors: broken on purpose"):
        resolve_backend("cuda", "cpu")
    assert resolve_backend("auto", "cpu") == "reference"
    args, kwargs = make_inputs(Case(2, 3, 4, 5, 5, k=2), requires_grad=False)
    with pytest.raises(RuntimeError, match="To fix"):
        fastblock.mixed_conv_bn_relu(*args, backend="triton")


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend("cudnn", "cpu")
