"""Backend reporting and selection."""
import warnings

import pytest
import torch

import fastblock
from fastblock.backends import resolve_backend
from helpers import Case, make_inputs


def test_available_backends_reports_every_backend_with_a_reason():
    report = fastblock.available_backends("cpu")
    assert set(report) == {"triton", "extension", "reference"}
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
    ext = fastblock.available_backends("cpu")["extension"].available
    assert resolve_backend("auto", "cpu") == ("extension" if ext else "reference")


def test_env_var_overrides_auto(monkeypatch):
    monkeypatch.setenv("FASTBLOCK_BACKEND", "reference")
    assert resolve_backend("auto", "cpu") == "reference"
    monkeypatch.setenv("FASTBLOCK_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTBLOCK_BACKEND"):
        resolve_backend("auto", "cpu")


def test_explicit_unavailable_backend_raises_not_falls_back(monkeypatch):
    from fastblock import backends

    monkeypatch.setattr(backends.Backend, "status",
                        lambda self, device_type: backends.BackendStatus(self.name == "reference", "broken on purpose"))
    with pytest.raises(RuntimeError, match="backend 'extension' cannot run on cpu tensors: broken on purpose"):
        resolve_backend("cuda", "cpu")
    assert resolve_backend("auto", "cpu") == "reference"
    args, kwargs = make_inputs(Case(2, 3, 4, 5, 5, k=2), requires_grad=False)
    with pytest.raises(RuntimeError, match="To fix"):
        fastblock.mixed_conv_bn_relu(*args, backend="triton")


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend("cudnn", "cpu")


def test_a_fourth_backend_is_one_module_and_one_registry_entry():
    """A toy backend -- a module with status/forward/backward wrapping the reference -- registered once becomes a
    valid ``backend=`` everywhere (op, Block, status report) and runs through the custom-op seam, eager and
    under torch.compile, with the reference's answers."""
    import types

    import torch.nn.functional as F

    from fastblock.reference import ACTIVATIONS, gated_conv_reference
    from helpers import compare_with_reference

    def forward(x, gates, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                use_batch_stats, momentum, eps, stride, pad_h, pad_w, save_for_backward, activation="relu",
                pool=False):
        z = gated_conv_reference(x, gates, weight, bias, stride, (pad_h, pad_w))
        zn = F.max_pool2d(z, 2) if pool else z
        if use_batch_stats:
            mean, var = zn.mean((0, 2, 3)), zn.var((0, 2, 3), unbiased=False)
            if running_mean is not None:
                count = zn.numel() // zn.shape[1]
                running_mean.lerp_(mean.to(running_mean.dtype), momentum)
                running_var.lerp_((var * count / (count - 1)).to(running_var.dtype), momentum)
        else:
            mean, var = running_mean.clone(), running_var
        invstd = torch.rsqrt(var + eps)
        y = ACTIVATIONS[activation]((zn - mean[:, None, None]) * (invstd * bn_weight)[:, None, None]
                                    + bn_bias[:, None, None])
        return y, (z if save_for_backward else x.new_empty((0,))), mean, invstd

    def backward(dy, x, gates, weight, bias, bn_weight, bn_bias, z, mean, invstd, use_batch_stats, stride,
                 pad_h, pad_w, need_dx=True, need_dgates=True, activation="relu", pool=False):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in (x, gates, weight, bias, bn_weight, bn_bias)]
            zz = gated_conv_reference(*leaves[:4], stride, (pad_h, pad_w))
            zz = F.max_pool2d(zz, 2) if pool else zz
            if use_batch_stats:
                normed = F.batch_norm(zz, None, None, leaves[4], leaves[5], training=True, eps=1e-5)
            else:
                normed = (zz - mean[:, None, None]) * (invstd * leaves[4])[:, None, None] + leaves[5][:, None, None]
            dx, dgates, *rest = torch.autograd.grad(ACTIVATIONS[activation](normed), leaves, dy)
        return (dx if need_dx else x.new_empty((0,)), dgates if need_dgates else gates.new_empty((0,)), *rest)

    toy = types.SimpleNamespace(status=lambda device_type: fastblock.BackendStatus(True, "toy: the reference"),
                                forward=forward, backward=backward)
    fastblock.register_backend(fastblock.Backend(name="toy", devices=("cpu",), auto_devices=(), auto_rank=50,
                                                 load=lambda: toy))
    try:
        assert "toy" in fastblock.available_backends("cpu") and "toy" in fastblock.backend_names()
        assert resolve_backend("auto", "cpu") != "toy"  # never picked by auto (auto_devices=())
        compare_with_reference("toy", Case(2, 3, 4, 5, 5, k=2), torch.float64, training=True)
        compare_with_reference("toy", Case(2, 3, 4, 5, 5, k=2, stride=2), torch.float64, training=False)
        compare_with_reference("toy", Case(2, 3, 4, 5, 5, k=2), torch.float64, training=True, activation="gelu")
        compare_with_reference("toy", Case(2, 3, 4, 5, 5, k=2), torch.float64, training=True, pool=True)
        block = fastblock.Block(3, 4, num_convs=2, backend="toy").double()
        reference = fastblock.Block(3, 4, num_convs=2, backend="reference").double()
        reference.load_state_dict(block.state_dict())
        x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
        y = torch.compile(block, fullgraph=True, backend="aot_eager")(x)
        torch.testing.assert_close(y, reference(x))
    finally:
        fastblock.unregister_backend("toy")
    with pytest.raises(ValueError, match="unknown backend 'toy'"):
        resolve_backend("toy", "cpu")


def test_auto_self_check_falls_back_past_a_wrong_backend(monkeypatch):
    """A backend that would be auto's first choice but computes a wrong answer (here: y off by 1%) fails the
    runtime self-check: auto warns once and takes the next backend, the report says why, and an explicit request
    raises with that reason. FASTBLOCK_SELF_CHECK=0 skips the check."""
    import types

    from fastblock import self_check

    ext = fastblock.get_backend("extension")
    if not fastblock.available_backends("cpu")["extension"].available:
        pytest.skip("needs the extension as the backend to wrap")
    real = ext.module()

    def wrong_forward(*args):
        y, z, mean, invstd = real.forward(*args)
        return y * 1.01, z, mean, invstd

    broken = types.SimpleNamespace(status=real.status, forward=wrong_forward, backward=real.backward)
    fastblock.register_backend(fastblock.Backend(name="broken", devices=("cpu",), auto_devices=("cpu",),
                                                 auto_rank=-1, load=lambda: broken))
    monkeypatch.setattr(self_check, "_results", {})
    try:
        monkeypatch.setenv("FASTBLOCK_SELF_CHECK", "0")
        assert resolve_backend("auto", "cpu", dtype=torch.float32) == "broken"
        monkeypatch.setenv("FASTBLOCK_SELF_CHECK", "1")
        with pytest.warns(RuntimeWarning, match="'broken' failed its self-check on cpu"):
            assert resolve_backend("auto", "cpu", dtype=torch.float32) == "extension"
        report = fastblock.available_backends("cpu")["broken"]
        assert not report.available and "differs from the reference" in report.reason
        with pytest.raises(RuntimeError, match="failed its self-check"):
            resolve_backend("broken", "cpu")
        args, kwargs = make_inputs(Case(2, 3, 4, 5, 5, k=2), requires_grad=False)
        y = fastblock.mixed_conv_bn_relu(*args, backend="auto", **kwargs)  # the extension's answer, no warning
        torch.testing.assert_close(y, fastblock.mixed_conv_bn_relu(*args, backend="reference", **kwargs))
    finally:
        fastblock.unregister_backend("broken")


def test_self_check_passes_for_the_real_backends():
    from fastblock import self_check

    for name in fastblock.backend_names():
        backend = fastblock.get_backend(name)
        if backend.fused and fastblock.available_backends("cpu")[name].available:
            # (the Triton CPU interpreter's bf16 dot products are wrong: bf16 there is for GPUs only)
            dtypes = (torch.float32, torch.float64) + ((torch.bfloat16,) if name != "triton" else ())
            for dtype in dtypes:
                assert self_check._run(backend.module(), torch.device("cpu"), dtype) is None, (name, dtype)


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "autocast"])
def test_self_check_runs_from_any_context(context, monkeypatch):
    """The first use of a backend may come under no_grad (a FLOP count, an evaluation), inference_mode or
    autocast: the check still runs its autograd reference and passes (it once failed there and sent a whole
    training run to the reference backend)."""
    from fastblock import self_check

    if not fastblock.available_backends("cpu")["extension"].available:
        pytest.skip("needs the extension")
    monkeypatch.setattr(self_check, "_results", {})
    ctx = {"no_grad": torch.no_grad(), "inference_mode": torch.inference_mode(),
           "autocast": torch.autocast("cpu", dtype=torch.bfloat16)}[context]
    args, kwargs = make_inputs(Case(2, 3, 4, 5, 5, k=2), requires_grad=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ctx:
            assert resolve_backend("auto", "cpu", dtype=torch.float32) == "extension"
            fastblock.mixed_conv_bn_relu(*args, backend="auto", **kwargs)
    assert self_check.failure("extension", torch.device("cpu"), torch.float32) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_self_check_catches_a_wrong_low_precision_backend(dtype):
    """The few 16-bit outliers the check allows (ReLU-threshold rounding) do not let a wrong kernel through: a
    forward 25% off, or a dx wrong in one sample, fails in bf16 as in float32."""
    import types

    from fastblock import self_check

    if not fastblock.available_backends("cpu")["extension"].available:
        pytest.skip("needs the extension as the backend to wrap")
    real = fastblock.get_backend("extension").module()

    def scaled_forward(*args):
        y, z, mean, invstd = real.forward(*args)
        return y * 1.25, z, mean, invstd

    def one_sample_backward(*args):
        dx, *rest = real.backward(*args)
        dx = dx.clone()
        dx[0] *= -1
        return (dx, *rest)

    for wrong in (types.SimpleNamespace(forward=scaled_forward, backward=real.backward),
                  types.SimpleNamespace(forward=real.forward, backward=one_sample_backward)):
        why = self_check._run(wrong, torch.device("cpu"), dtype)
        assert why is not None and "differs from the reference" in why


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_self_check_covers_the_gelu_and_pool_paths(dtype):
    """A backend right with ReLU but wrong only on the Block's other paths -- the GELU epilogue, or the gradient
    routed through the 2x2 max-pool -- fails the check too, which says which path (checked in float32 whatever the
    dtype, so the pool's argmax is the reference's)."""
    import types

    from fastblock import self_check

    if not fastblock.available_backends("cpu")["extension"].available:
        pytest.skip("needs the extension as the backend to wrap")
    real = fastblock.get_backend("extension").module()

    def gelu_off(*args):  # the GELU epilogue 2% off
        y, z, mean, invstd = real.forward(*args)
        return (y * 1.02 if args[15] == "gelu" else y), z, mean, invstd

    def pool_misrouted(*args):  # dx of the pooled paths from a gradient shifted by one window
        if not args[-1]:
            return real.backward(*args)
        dy = args[0].roll(1, dims=-1)
        return real.backward(dy, *args[1:])

    for wrong in (types.SimpleNamespace(forward=gelu_off, backward=real.backward),
                  types.SimpleNamespace(forward=real.forward, backward=pool_misrouted)):
        why = self_check._run(wrong, torch.device("cpu"), dtype)
        assert why is not None and why.startswith("(gelu, pool)") and "differs from the reference" in why, why


def test_auto_passes_over_triton_on_pre_ampere_gpus(monkeypatch):
    """On a GPU below compute capability 8.0 (T4: 7.5) auto takes the extension (cuDNN's tensor cores) over
    Triton (no 16-bit tensor-core path there); from 8.0 on, Triton; a request by name still gets Triton."""
    from fastblock import backends

    monkeypatch.setattr(backends.Backend, "status", lambda self, device_type: fastblock.BackendStatus(True, "mock"))
    assert backends._resolve("auto", "cuda", "auto", 2, (7, 5)) == "extension"
    assert backends._resolve("auto", "cuda", "auto", 2, (8, 0)) == "triton"
    assert backends._resolve("auto", "cuda", "auto", 2, (9, 0)) == "triton"
    assert backends._resolve("triton", "cuda", "auto", 2, (7, 5)) == "triton"


@pytest.mark.parametrize("backend", [n for n in fastblock.backend_names() if fastblock.get_backend(n).fused])
@pytest.mark.parametrize("layout", ["contiguous", "permuted"])
@pytest.mark.parametrize("needs", [(True, True), (False, True), (True, False), (False, False)],
                         ids=["all", "no_dx", "no_dgates", "neither"])
@pytest.mark.parametrize("pool", [False, True], ids=["", "pool"])
def test_backward_op_passes_opcheck(backend, layout, needs, pool):
    """torch.library.opcheck of the backward op: its fake kernel declares the strides the real one returns, also
    for parameters held in other dense layouts (Block.to(memory_format=torch.channels_last) gives the weight
    channels-last strides; under torch.compile a mismatch fails the compiled backward's stride assertion)."""
    if not fastblock.available_backends("cpu")[backend].available:
        pytest.skip(f"{backend} not available on CPU here")
    args, kwargs = make_inputs(Case(2, 3, 4, 5, 5, k=2), requires_grad=False)
    x, gates, weight, bias, gw, gb, rm, rv = args
    if layout == "permuted":  # dense, not contiguous: every argument
        x = x.contiguous(memory_format=torch.channels_last)
        weight = weight.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)  # per kernel channels-last
        gates = gates.t().contiguous().t()
        bias = bias.t().contiguous().t()
        assert not weight.is_contiguous() and not gates.is_contiguous()
    y, z, mean, invstd = torch.ops.fastblock.mixed_conv_bn_relu_fwd(x, gates, weight, bias, gw, gb, rm.clone(),
                                                                    rv.clone(), True, 0.1, 1e-5, 1, 1, 1, True,
                                                                    "relu", pool, backend)
    assert y.shape[2:] == ((2, 2) if pool else (5, 5)) and z.shape[2:] == (5, 5)
    dy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.fastblock.mixed_conv_bn_relu_fwd.default,
                          (x, gates, weight, bias, gw, gb, rm.clone(), rv.clone(), True, 0.1, 1e-5, 1, 1, 1, True,
                           "relu", pool, backend),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.fastblock.mixed_conv_bn_relu_bwd.default,
                          (dy, x, gates, weight, bias, gw, gb, z, mean, invstd, True, 1, 1, 1, *needs, "relu", pool,
                           backend),
                          test_utils=("test_schema", "test_faketensor"))
