"""Triton backend vs the reference (CPU: under TRITON_INTERPRET=1, set in conftest)."""
import pytest
import torch

import fastblock
from helpers import SHAPES, Case, check_fake_tensor_mode, compare_with_reference, gradcheck_backend, stable_seed

pytestmark = pytest.mark.skipif(not fastblock.available_backends("cpu")["triton"].available
                                and not torch.cuda.is_available(),
                                reason="triton unavailable: " + fastblock.available_backends("cpu")["triton"].reason)


@pytest.mark.parametrize("case", SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_triton_matches_reference_fp32(case, training, schedule):
    compare_with_reference("triton", case, torch.float32, training=training, seed=stable_seed(case, training) % 997)


@pytest.mark.parametrize("case", [SHAPES[0], SHAPES[1], SHAPES[4]], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_triton_matches_reference_fp64(case, training, schedule):
    compare_with_reference("triton", case, torch.float64, training=training, seed=7)


@pytest.mark.parametrize("case", [SHAPES[0], SHAPES[1], SHAPES[4]], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_triton_gelu_matches_reference(case, training, schedule):
    """activation="gelu": the normalise kernel, the eval epilogue and both backward kernels."""
    compare_with_reference("triton", case, torch.float32, training=training, seed=stable_seed(case, training) % 983,
                           activation="gelu")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_triton_gelu_gradcheck_fp64(training, schedule):
    gradcheck_backend("triton", Case(2, 2, 3, 4, 3, k=2), training=training, fast_mode=True, activation="gelu")


@pytest.mark.parametrize("case", [SHAPES[0], SHAPES[1], SHAPES[4]], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_triton_pool_matches_reference(case, training, schedule):
    """pool=True: the pooling kernel (with the pooled map's statistics), the un-pooling kernel, odd sizes."""
    compare_with_reference("triton", case, torch.float32, training=training, seed=stable_seed(case, training) % 977,
                           pool=True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_triton_pool_gelu_fp64_and_gradcheck(training):
    case = Case(2, 2, 3, 5, 4, k=2, channels_last=True)
    compare_with_reference("triton", case, torch.float64, training=training, seed=5, activation="gelu", pool=True)
    gradcheck_backend("triton", Case(2, 2, 3, 4, 5, k=2), training=training, fast_mode=True, pool=True)


def test_triton_pool_inference_does_not_fold():
    """Eval mode without autograd: no BatchNorm folded ahead of the pool (negative scales included)."""
    from helpers import make_inputs

    args, kwargs = make_inputs(Case(2, 3, 4, 6, 5, k=2), torch.float32, requires_grad=False)
    args[4][::2] *= -1  # bn_weight
    with torch.no_grad():
        y = fastblock.mixed_conv_bn_relu(*args, training=False, backend="triton", pool=True, **kwargs)
        y_ref = fastblock.mixed_conv_bn_relu(*args, training=False, backend="reference", pool=True, **kwargs)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("frozen", [("x",), ("gates",), ("x", "gates")], ids="+".join)
def test_triton_skips_gradients_nobody_wants(frozen, schedule):
    """An input or gates that do not require grad get none (the dx kernel is not launched for x); the other
    gradients stay exact."""
    compare_with_reference("triton", Case(2, 3, 4, 5, 4, k=2), torch.float32, seed=stable_seed(frozen) % 997,
                           frozen=frozen)


@pytest.mark.parametrize("case", [Case(2, 2, 3, 4, 3, k=2), Case(3, 2, 2, 3, 5, k=1, stride=2, channels_last=True)],
                         ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_triton_gradcheck_fp64(case, training, schedule):
    gradcheck_backend("triton", case, training=training, fast_mode=True)


def test_triton_gradcheck_fp64_full_jacobian():
    """One full-Jacobian check (slow under the interpreter: ~400 kernel runs)."""
    gradcheck_backend("triton", Case(2, 1, 2, 3, 3, k=2, stride=2), training=True, fast_mode=False)


def test_triton_statistics_are_stable_with_a_large_mean():
    """Sum/sum-of-squares would cancel catastrophically here; the (mean, M2) merge does not."""
    case = Case(4, 3, 4, 8, 8, k=2)
    from helpers import make_inputs

    args, kwargs = make_inputs(case, torch.float32, requires_grad=False)
    args[3] = torch.full((2, 4), 1000.0)  # bias shifts every channel's mean far from 0
    rm_t, rv_t = args[6].clone(), args[7].clone()
    fastblock.mixed_conv_bn_relu(*args[:6], rm_t, rv_t, backend="triton", **kwargs)
    ref_args = [a.double() for a in args]
    fastblock.mixed_conv_bn_relu(*ref_args, backend="reference", **kwargs)
    torch.testing.assert_close(rv_t.double(), ref_args[7], rtol=1e-4, atol=1e-4)


def test_triton_inference_without_grad_skips_z():
    case = SHAPES[0]
    from helpers import make_inputs

    args, kwargs = make_inputs(case, torch.float32, requires_grad=False)
    with torch.no_grad():
        y = fastblock.mixed_conv_bn_relu(*args, training=False, backend="triton", **kwargs)
    y_ref = fastblock.mixed_conv_bn_relu(*args, training=False, backend="reference", **kwargs)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)


def test_triton_block_under_torch_compile_fullgraph():
    """The Triton backend's custom ops trace as single nodes under torch.compile(fullgraph=True)."""
    torch.manual_seed(0)
    block = fastblock.Block(3, 4, num_convs=2, stride=2, backend="triton")
    eager = fastblock.Block(3, 4, num_convs=2, stride=2, backend="reference")
    eager.load_state_dict(block.state_dict())
    x = torch.randn(3, 3, 6, 5)
    y = torch.compile(block, fullgraph=True, backend="aot_eager")(x)
    y_ref = eager(x)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(block.weight.grad, eager.weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(block.bn.running_var, eager.bn.running_var, atol=1e-5, rtol=1e-5)


def test_triton_under_fake_tensor_mode():
    check_fake_tensor_mode("triton")


def test_aot_check_records_the_launchers_real_launches():
    """The ahead-of-time check compiles what the launcher launches: forward (train, eval with and without saving),
    backward, with the launcher's own tile settings (the GPU ones, not the interpreter's)."""
    from fastblock.triton_kernels import aot_check, configs

    launches = aot_check.capture_launches({"bf16": torch.bfloat16}, stages=((64, 8), (128, 4)), batch=8)
    names = {launch.name for launch in launches}
    assert names == {"mixed_conv_fwd_kernel", "mixed_conv_dx_kernel", "mixed_conv_dweight_kernel",
                     "bn_stats_finalize_kernel", "bn_act_normalize_kernel", "bn_act_bwd_reduce_kernel",
                     "sum_rows_kernel", "bn_act_bwd_dz_kernel", "max_pool2x2_kernel", "max_unpool2x2_kernel"}
    # the pooling kernel's three uses: forward with statistics (training), without (eval), with argmax (backward)
    pools = {(launch.kwargs["STATS"], launch.kwargs["ARGMAX"]) for launch in launches
             if launch.name == "max_pool2x2_kernel"}
    assert pools == {(True, False), (False, False), (False, True)}
    fwd = [launch for launch in launches if launch.name == "mixed_conv_fwd_kernel"]
    gpu_cfg = configs.conv_config(64, 64, torch.bfloat16, interp=False)
    assert any(launch.kwargs["BLOCK_M"] == gpu_cfg["BLOCK_M"] and launch.kwargs["num_warps"] == gpu_cfg["num_warps"]
               for launch in fwd)
    assert {launch.kwargs["EVAL"] for launch in fwd} == {True, False}
    # the convolution's own statistics only where BatchNorm normalises z itself (training without the pool); with
    # the pool, the pooling kernel takes the pooled map's, and the convolution stores z alone
    assert {(launch.kwargs["EVAL"], launch.kwargs["STATS"]) for launch in fwd} == {(True, False), (False, True),
                                                                                 (False, False)}
    assert all(launch.where for launch in launches)
    # GELU's kernels too (at the first stage): the eval epilogue, the normalise and both backward kernels
    gelu = {launch.name for launch in launches if launch.kwargs.get("GELU")}
    assert gelu == {"mixed_conv_fwd_kernel", "bn_act_normalize_kernel", "bn_act_bwd_reduce_kernel",
                    "bn_act_bwd_dz_kernel"}
    assert not any(launch.kwargs.get("GELU") and not launch.kwargs["EVAL"] for launch in fwd)


def test_launches_run_on_the_tensors_gpu(monkeypatch):
    """Triton launches on the current device: the launcher makes the tensors' GPU current (x on cuda:1 while
    cuda:0 is current must not launch on cuda:0)."""
    import types

    from fastblock import triton_backend

    entered, seen = [], []

    class FakeDeviceGuard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.pop()

    monkeypatch.setattr(torch.cuda, "device", FakeDeviceGuard)
    launcher = triton_backend._on_tensor_device(lambda first, *args: seen.append(list(entered)))
    launcher(types.SimpleNamespace(device=torch.device("cuda", 1)), 1, 2)
    launcher(torch.zeros(1))  # CPU (interpreter): no guard
    assert seen == [[torch.device("cuda", 1)], []] and entered == []
    assert triton_backend.forward.__wrapped__ and triton_backend.backward.__wrapped__


def test_triton_refuses_kernels_past_32_bit_indexing():
    """The concatenation loop indexes within one W_k in 32 bits: a larger kernel gets a clear error, never a
    wrapped index (expanded tensors: nothing that large is allocated)."""
    from fastblock import triton_backend

    c = 46341  # c * c > 2**31
    x = torch.zeros(1, 1, 1, 1).expand(1, c, 1, 1)
    weight = torch.zeros(1, 1, 1, 1, 1).expand(1, c, c, 1, 1)
    with pytest.raises(ValueError, match="2\\*\\*31 elements per convolution kernel"):
        triton_backend.forward(x, torch.ones(1, 1), weight, torch.zeros(1, c), torch.ones(c), torch.zeros(c),
                               None, None, True, 0.1, 1e-5, 1, 0, 0, True)
