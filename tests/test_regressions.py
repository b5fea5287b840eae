"""Plain regression tests, one per defect found (by an outside probe or by tests/test_properties.py shrinking a
failure): each backend behaves like the reference, or raises where the reference raises."""
import pytest
import torch

import fastblock
from helpers import Case, TOLERANCES, compare_with_reference, make_inputs, run_op

FUSED = [n for n in fastblock.backend_names() if fastblock.get_backend(n).fused]
ALL = list(fastblock.backend_names())


def _skip_unavailable(backend):
    status = fastblock.available_backends("cpu")[backend]
    if not status.available:
        pytest.skip(f"{backend} unavailable: {status.reason}")


def _strided(t: torch.Tensor) -> torch.Tensor:
    buf = torch.full((2 * t.numel(),), 123.0, dtype=t.dtype)
    buf[::2] = t
    return buf[::2]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_strided_running_statistics_are_updated_in_place(backend, dtype):
    """running_mean=buf[::2]: the view's elements are updated, the buffer's other elements are left alone (Triton
    used to write the wrong storage elements; the extension refused views)."""
    _skip_unavailable(backend)
    args, kwargs = make_inputs(Case(2, 3, 5, 6, 5, k=2), dtype, requires_grad=False)
    rm_view, rv_view = _strided(args[6]), _strided(args[7])
    rm_dense, rv_dense = args[6].clone(), args[7].clone()
    fastblock.mixed_conv_bn_relu(*args[:6], rm_view, rv_view, training=True, backend=backend, **kwargs)
    fastblock.mixed_conv_bn_relu(*args[:6], rm_dense, rv_dense, training=True, backend="reference", **kwargs)
    atol, rtol = TOLERANCES[dtype]
    for view, dense in ((rm_view, rm_dense), (rv_view, rv_dense)):
        torch.testing.assert_close(view, dense, atol=atol, rtol=rtol)
        assert bool((view._base[1::2] == 123.0).all()), "elements outside the view were written"


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_strided_batchnorm_parameters(backend, training):
    """Non-contiguous bn_weight / bn_bias give the same output and gradients as the same values made contiguous
    (Triton was off by up to ~3-4)."""
    _skip_unavailable(backend)
    args, kwargs = make_inputs(Case(2, 3, 5, 6, 5, k=2), torch.float64)
    strided = list(args)
    strided[4] = _strided(args[4].detach()).requires_grad_(True)
    strided[5] = _strided(args[5].detach()).requires_grad_(True)
    y, grads, _, _ = run_op(backend, strided, kwargs, training)
    y_ref, grads_ref, _, _ = run_op(None, args, kwargs, training)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-9)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nan_propagates_like_torch_relu(backend, training):
    """A NaN in x reaches y (and the running statistics) exactly where it does in the reference: torch.relu keeps
    NaN (Triton's maximum dropped it), and its backward passes the gradient at a NaN."""
    _skip_unavailable(backend)
    args, kwargs = make_inputs(Case(2, 3, 4, 6, 5, k=2), torch.float64)
    x = args[0].detach().clone()
    x[0, 1, 2, 3] = float("nan")
    args[0] = x.requires_grad_(True)
    out, ref = run_op(backend, args, kwargs, training), run_op(None, args, kwargs, training)
    assert torch.isnan(ref[0]).any()
    assert torch.equal(torch.isnan(out[0]), torch.isnan(ref[0])), "y"
    for name in ref[1]:
        assert torch.equal(torch.isnan(out[1][name]), torch.isnan(ref[1][name])), f"d{name}"
    for i in (2, 3):
        assert torch.equal(torch.isnan(out[i]), torch.isnan(ref[i]))


@pytest.mark.parametrize("backend", FUSED)
def test_eval_backward_keeps_nan_local(backend):
    """Eval mode, one NaN input pixel: dx and dbias stay finite as in the reference (the extension spread the NaN
    into all of dx's neighbourhood, dbias and dW through a 0 * NaN term)."""
    _skip_unavailable(backend)
    args, kwargs = make_inputs(Case(1, 1, 1, 1, 1, k=1, ksize=1), torch.float64)
    x = args[0].detach().clone()
    x.fill_(float("nan"))
    args[0] = x.requires_grad_(True)
    out, ref = run_op(backend, args, kwargs, training=False), run_op(None, args, kwargs, training=False)
    torch.testing.assert_close(out[1]["x"], ref[1]["x"], atol=1e-12, rtol=1e-12)  # finite: the ReLU passes it
    torch.testing.assert_close(out[1]["bias"], ref[1]["bias"], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", ALL)
def test_batchnorm_dtype_rule_is_nn_batchnorm2ds(backend):
    """float64 x with float32 running statistics: every backend refuses it, as the reference (F.batch_norm) does;
    float16/bfloat16 x with float32 BatchNorm tensors is the allowed mixed case."""
    _skip_unavailable(backend)
    args, kwargs = make_inputs(Case(2, 3, 4, 5, 5, k=2), torch.float64, requires_grad=False)
    args[6], args[7] = args[6].float(), args[7].float()
    with pytest.raises(TypeError, match="running_mean has dtype torch.float32 but x has torch.float64"):
        fastblock.mixed_conv_bn_relu(*args, backend=backend, **kwargs)
    args, kwargs = make_inputs(Case(2, 3, 4, 5, 5, k=2), torch.bfloat16, requires_grad=False)
    assert fastblock.mixed_conv_bn_relu(*args, backend="reference", **kwargs).dtype == torch.bfloat16


def test_meta_tensors_propagate_shapes():
    """Shape propagation on meta tensors runs (the reference; autocast used to reject the device), and a Block
    built on meta and materialised with to_empty works."""
    args, kwargs = make_inputs(Case(2, 3, 4, 7, 6, k=3, stride=2), requires_grad=False)
    meta = [a.to("meta") for a in args]
    y = fastblock.mixed_conv_bn_relu(*meta, backend="auto", **kwargs)
    assert y.device.type == "meta" and tuple(y.shape) == (2, 4, 4, 3)
    assert fastblock.resolve_backend("auto", "meta") == "reference"
    assert not fastblock.available_backends("meta")["extension"].available
    with pytest.raises(RuntimeError, match="not meta"):
        fastblock.mixed_conv_bn_relu(*meta, backend="extension", **kwargs)
    block = fastblock.Block(3, 4, num_convs=2, device="meta")
    assert tuple(block(torch.empty(2, 3, 5, 5, device="meta")).shape) == (2, 4, 5, 5)
    block = block.to_empty(device="cpu")
    for module in block.modules():  # the usual initialisation after to_empty
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    assert torch.isfinite(block(torch.randn(2, 3, 5, 5))).all()


@pytest.mark.parametrize("backend", ALL)
def test_momentum_none(backend):
    """momentum=None: the op says how to get a cumulative average; Block implements it as nn.BatchNorm2d does."""
    _skip_unavailable(backend)
    args, kwargs = make_inputs(Case(2, 3, 4, 5, 5, k=2), requires_grad=False)
    with pytest.raises(ValueError, match="momentum=None"):
        fastblock.mixed_conv_bn_relu(*args, momentum=None, backend=backend, **kwargs)
    torch.manual_seed(0)
    block = fastblock.Block(3, 4, num_convs=1, momentum=None, backend=backend).double()
    bn = torch.nn.BatchNorm2d(4, momentum=None).double()
    conv = torch.nn.Conv2d(3, 4, 3, padding=1).double()
    with torch.no_grad():
        conv.weight.copy_(block.weight[0])
        conv.bias.copy_(block.bias[0])
    for seed in range(3):
        x = torch.randn(2, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        block(x)
        bn(conv(x))  # K=1 with a softmax gate: the gate is exactly 1
    torch.testing.assert_close(block.bn.running_mean, bn.running_mean, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(block.bn.running_var, bn.running_var, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", ALL)
def test_running_statistics_that_require_grad_are_refused(backend):
    _skip_unavailable(backend)
    args, kwargs = make_inputs(Case(2, 3, 4, 5, 5, k=2), requires_grad=False)
    args[6].requires_grad_(True)
    with pytest.raises(ValueError, match="running_mean requires grad"):
        fastblock.mixed_conv_bn_relu(*args, backend=backend, **kwargs)


def test_auto_passes_over_a_backend_that_cannot_take_k():
    """The extension holds K <= 16 per-sample gates in registers: ``auto`` falls back past it for larger K, an
    explicit request says why."""
    _skip_unavailable("extension")
    assert fastblock.get_backend("extension").max_convs == 16
    assert fastblock.resolve_backend("auto", "cpu", num_convs=16) == "extension"
    assert fastblock.resolve_backend("auto", "cpu", num_convs=17) == "reference"
    args, kwargs = make_inputs(Case(2, 2, 3, 4, 4, k=17), requires_grad=False)
    with pytest.raises(RuntimeError, match="at most K=16"):
        fastblock.mixed_conv_bn_relu(*args, backend="extension", **kwargs)
    assert fastblock.mixed_conv_bn_relu(*args, backend="auto", **kwargs).shape == (2, 3, 4, 4)


def test_cuda_is_an_alias_of_the_extension():
    _skip_unavailable("extension")
    assert fastblock.resolve_backend("cuda", "cpu") == "extension"
    compare_with_reference("cuda", Case(2, 3, 4, 5, 5, k=2), torch.float64)
    block = fastblock.Block(3, 4, num_convs=2, backend="cuda")
    assert block.backend == "cuda" and block(torch.randn(2, 3, 5, 5)).shape == (2, 4, 5, 5)


def test_reference_is_right_with_a_strided_batchnorm_weight():
    """Found by the property suite: F.batch_norm's CPU backward gives a wrong input gradient for a strided weight at
    N*H*W = 2 (torch 2.14). The reference passes a contiguous copy, so it stays the ground truth."""
    import torch.nn.functional as F

    z = torch.randn(2, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dy = torch.tensor([1.0, 2.0, 3.0, 0.5], dtype=torch.float64).view(2, 2, 1, 1)
    buf = torch.full((4,), 7.0, dtype=torch.float64)
    buf[::2] = torch.tensor([1.2, 0.8], dtype=torch.float64)
    grads = []
    for weight in (buf[::2].clone(), buf[::2]):
        zz = z.clone().requires_grad_(True)
        F.batch_norm(zz, None, None, weight, None, training=True).backward(dy)
        grads.append(zz.grad)
    torch_is_right = torch.allclose(grads[0], grads[1])
    args, kwargs = make_inputs(Case(2, 1, 2, 1, 1, k=1, ksize=1, bias=False), torch.float64)
    strided = list(args)
    strided[4] = _strided(args[4].detach()).requires_grad_(True)
    _, g_strided, _, _ = run_op("reference", strided, kwargs, training=True)
    _, g_dense, _, _ = run_op("reference", args, kwargs, training=True)
    torch.testing.assert_close(g_strided["x"], g_dense["x"], atol=1e-12, rtol=1e-10)
    assert torch_is_right or not torch.allclose(grads[0], grads[1])  # documents torch's behaviour either way


def test_reference_is_right_with_a_strided_running_var_in_eval():
    """Found by the property suite: F.batch_norm's CPU backward in eval mode reads a strided running_var wrongly
    (torch 2.14: dx = 1/sqrt(eps)); the reference normalises with contiguous copies."""
    args, kwargs = make_inputs(Case(1, 1, 2, 1, 1, k=1, ksize=1, bias=False), torch.float64)
    strided = list(args)
    strided[7] = _strided(args[7])
    _, g_strided, _, _ = run_op("reference", strided, kwargs, training=False)
    _, g_dense, _, _ = run_op("reference", args, kwargs, training=False)
    torch.testing.assert_close(g_strided["x"], g_dense["x"], atol=1e-12, rtol=1e-10)
