"""The C++/CUDA extension backend ("extension") vs the reference: C++ kernels on CPU tensors."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastblock
from fastblock import extension
from helpers import (ARG_NAMES, SHAPES, Case, check_fake_tensor_mode, compare_low_precision,
                     compare_with_reference, gradcheck_backend, make_inputs, run_op, stable_seed)

_STATUS = fastblock.available_backends("cpu")["extension"]
pytestmark = pytest.mark.skipif(not _STATUS.available, reason=f"extension unavailable: {_STATUS.reason}")


@pytest.mark.parametrize("case", SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_extension_matches_reference(case, training, dtype, schedule):
    compare_with_reference("extension", case, dtype, training=training, seed=stable_seed(case, training) % 991)


@pytest.mark.parametrize("case", SHAPES[:5], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_extension_gradcheck_fp64(case, training, schedule):
    gradcheck_backend("extension", case, training=training)


def test_extension_bf16_cpu():
    compare_with_reference("extension", Case(4, 8, 8, 6, 6, k=3), torch.bfloat16, training=True)


@pytest.mark.parametrize("case", SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_extension_gelu_matches_reference(case, training, dtype, schedule):
    """activation="gelu": the forward (and eval mode's folded path), all gradients and the statistics."""
    compare_with_reference("extension", case, dtype, training=training, seed=stable_seed(case, training) % 989,
                           activation="gelu")


@pytest.mark.parametrize("case", SHAPES[:5], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_extension_gelu_gradcheck_fp64(case, training, schedule):
    gradcheck_backend("extension", case, training=training, activation="gelu")


def test_extension_gelu_bf16_cpu():
    compare_with_reference("extension", Case(4, 8, 8, 6, 6, k=3, channels_last=True), torch.bfloat16, training=True,
                           activation="gelu")


def test_extension_gelu_inference_fold():
    """Eval mode without autograd folds BatchNorm into the convolution and applies the activation in place."""
    args, kwargs = make_inputs(Case(2, 3, 5, 6, 6, k=2), torch.float64, requires_grad=False)
    with torch.no_grad():
        for activation in ("relu", "gelu"):
            y = fastblock.mixed_conv_bn_relu(*args, training=False, backend="extension", activation=activation,
                                             **kwargs)
            y_ref = fastblock.mixed_conv_bn_relu(*args, training=False, backend="reference", activation=activation,
                                                 **kwargs)
            torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-9)
            assert (y < 0).any() == (activation == "gelu")


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("case", SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_extension_pool_matches_reference(case, training, dtype, activation, schedule):
    """pool=True: the 2x2 max-pool between the convolutions and BatchNorm (odd sizes drop a row/column), the pooled
    map's statistics, and the backward's recomputed argmax routing the gradient."""
    compare_with_reference("extension", case, dtype, training=training, seed=stable_seed(case, training) % 983,
                           activation=activation, pool=True)


@pytest.mark.parametrize("case", SHAPES[:5], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_extension_pool_gradcheck_fp64(case, training, schedule):
    gradcheck_backend("extension", case, training=training, pool=True)


@pytest.mark.parametrize("case", [Case(3, 5, 19, 7, 6, k=3, channels_last=True),
                                  Case(5, 6, 7, 3, 3, k=2, stride=2, channels_last=True)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_extension_pool_channels_last(case, dtype):
    """Channels-last end to end with pool=True: the row kernels on the pooled map, in every dtype."""
    for training in (True, False):
        compare_with_reference("extension", case, dtype, training=training, pool=True,
                               seed=stable_seed(case, dtype, training) % 983)


def test_extension_pool_inference_does_not_fold():
    """Eval mode without autograd: BatchNorm is not folded into the convolution ahead of the pool (a negative scale
    would pick the window's minimum), the result is the reference's for every sign of the scale."""
    args, kwargs = make_inputs(Case(2, 3, 6, 7, 6, k=2), torch.float64, requires_grad=False)
    args[4][::2] *= -1  # bn_weight
    with torch.no_grad():
        for activation in ("relu", "gelu"):
            y = fastblock.mixed_conv_bn_relu(*args, training=False, backend="extension", activation=activation,
                                             pool=True, **kwargs)
            y_ref = fastblock.mixed_conv_bn_relu(*args, training=False, backend="reference", activation=activation,
                                                 pool=True, **kwargs)
            assert y.shape == (2, 6, 3, 3)
            torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])  # with K=1 softmax gates are exactly 1, sigmoid's are not
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_extension_ungated_k1(gate, channels_last, training):
    """K=1 without a bias: gates of exactly 1 take the plain-convolution shortcut (no gated copy of x, no bias pass);
    other gates the full path. Both against the reference, with the gate gradient (gradcheck moves the gates off
    1, so the shortcut's analytic gradient is checked against the full path's numbers)."""
    case = Case(3, 5, 6, 7, 6, k=1, bias=False, channels_last=channels_last)
    seed = stable_seed(gate, channels_last, training) % 991
    for dtype in (torch.float32, torch.float64):
        compare_with_reference("extension", case, dtype, training=training, seed=seed, gate=gate)
    gradcheck_backend("extension", case, training=training, seed=seed, gate=gate)
    compare_with_reference("extension", dataclasses.replace(case, bias=True), torch.float64, training=training,
                           seed=seed, gate=gate)
    args, kwargs = make_inputs(case, torch.float32, requires_grad=False, gate=gate)
    with torch.profiler.profile() as prof:
        fastblock.mixed_conv_bn_relu(*args, training=training, backend="extension", **kwargs)
    assert any(e.key == "fastblock_ext::expand_gated" for e in prof.key_averages()) == (gate == "sigmoid")


@pytest.mark.parametrize("frozen", [("x",), ("gates",), ("x", "gates")], ids="+".join)
@pytest.mark.parametrize("case", [Case(3, 5, 6, 7, 6, k=2), Case(2, 4, 5, 6, 5, k=1, bias=False, channels_last=True),
                                  Case(3, 4, 6, 5, 5, k=3, stride=2, channels_last=True)], ids=str)
def test_extension_skips_gradients_nobody_wants(case, frozen, schedule):
    """An input or gates that do not require grad get none, the other gradients stay exact; the concatenation
    schedule runs its reduction (reduce_gated) only for what is wanted of it: dgates, or a gated Block's dx."""
    seed = stable_seed(case, frozen) % 991
    for dtype in (torch.float32, torch.float64):
        compare_with_reference("extension", case, dtype, training=True, seed=seed, frozen=frozen)
    args, kwargs = make_inputs(case, torch.float32, seed=seed)
    for name in frozen:
        args[ARG_NAMES.index(name)].requires_grad_(False)
    with torch.profiler.profile() as prof:
        fastblock.mixed_conv_bn_relu(*args, training=True, backend="extension", **kwargs).sum().backward()
    reduced = any(e.key == "fastblock_ext::reduce_gated" for e in prof.key_averages())
    if schedule == "concat":  # the reduction gives dgates, and a gated dx (K=1 softmax gates are 1: ungated)
        need_dx, need_dgates = "x" not in frozen, "gates" not in frozen
        assert reduced == (need_dgates or (need_dx and case.k > 1))


def test_extension_chunked_samples(monkeypatch):
    """A 2-sample chunk budget forces the multi-chunk path (mixed kernels and weight gradients per chunk)."""
    per_sample_bytes = 8 * 6 * 5 * 5 * 4  # Cout * Cin * k * k * sizeof(float)
    monkeypatch.setenv("FASTBLOCK_EXT_CHUNK_BYTES", str(2 * per_sample_bytes))
    compare_with_reference("extension", Case(7, 6, 8, 5, 6, k=3, ksize=5), torch.float32, training=True)
    compare_with_reference("extension", Case(5, 6, 8, 5, 6, k=2, ksize=5, stride=2), torch.float64, training=False)


# CPU weight gradients of outputs up to 16 pixels are one matrix product over gathered patches instead of oneDNN's
# kernel: both sides of the limit (4x4 and 5x4 outputs), stride 2 (7x7 -> 4x4), a 5x5 kernel, a 1x1 kernel (no
# padding), K=1 and K=3, NCHW and channels-last.
GEMM_WEIGHT_GRAD_SHAPES = [
    Case(3, 5, 7, 4, 4, k=2, channels_last=True),
    Case(3, 5, 7, 5, 4, k=2, channels_last=True),
    Case(2, 6, 4, 7, 7, k=3, stride=2),
    Case(2, 4, 9, 4, 3, k=1, ksize=5, channels_last=True),
    Case(4, 7, 5, 3, 3, k=2, ksize=1, bias=False),
]


@pytest.mark.parametrize("case", GEMM_WEIGHT_GRAD_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_extension_small_output_weight_grad(case, dtype):
    """The matrix-product weight gradient matches the reference, and only small outputs take it (its profiler
    scope shows)."""
    compare_with_reference("extension", case, dtype, training=True, seed=stable_seed(case) % 983)
    args, kwargs = make_inputs(case, dtype)
    with torch.profiler.profile() as prof:
        y = fastblock.mixed_conv_bn_relu(*args, training=True, backend="extension", **kwargs)
        y.sum().backward()
    pad = case.ksize // 2  # as make_inputs pads
    ho = (case.h + 2 * pad - case.ksize) // case.stride + 1
    wo = (case.w + 2 * pad - case.ksize) // case.stride + 1
    took_gemm = any(e.key == "fastblock_ext::weight_grad_gemm" for e in prof.key_averages())
    assert took_gemm == (ho * wo <= 16), (ho, wo)


def test_extension_small_output_weight_grad_chunked(monkeypatch):
    """A chunk budget of about one sample's patches sums the weight gradient over several chunks."""
    case = Case(5, 6, 8, 4, 4, k=2, channels_last=True)
    monkeypatch.setenv("FASTBLOCK_EXT_CHUNK_BYTES", str(16 * 9 * 2 * 6 * 8))  # pixels * taps * K*Cin * float64
    compare_with_reference("extension", case, torch.float64, training=True)
    gradcheck_backend("extension", case, training=True)


@pytest.mark.parametrize("k,hw,expect_concat", [(4, 6, True), (4, 8, False), (2, 8, True), (2, 12, False),
                                                 (1, 16, True), (6, 6, False)])
def test_extension_default_schedule(k, hw, expect_concat):
    """Unless a schedule is forced the op concatenates where (K-1) * output pixels < 144, and for K=1 (the
    concatenation's expand_gated scope shows in the profile: sigmoid gates, never exactly 1), and matches the
    reference either way."""
    case = Case(3, 4, 5, hw, hw, k=k)
    compare_with_reference("extension", case, torch.float32, training=True)
    args, kwargs = make_inputs(case, torch.float32, requires_grad=False, gate="sigmoid")
    with torch.profiler.profile() as prof:
        fastblock.mixed_conv_bn_relu(*args, training=True, backend="extension", **kwargs)
    assert any(e.key == "fastblock_ext::expand_gated" for e in prof.key_averages()) == expect_concat


def test_extension_eval_inference_folds_batchnorm(schedule):
    args, kwargs = make_inputs(SHAPES[0], torch.float32, requires_grad=False)
    with torch.no_grad():
        y = fastblock.mixed_conv_bn_relu(*args, training=False, backend="extension", **kwargs)
    y_ref = fastblock.mixed_conv_bn_relu(*args, training=False, backend="reference", **kwargs)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)


def test_extension_rejects_bad_input_in_cpp():
    """Called directly (bypassing the Python checks), the op's TORCH_CHECKs give clear errors, not crashes."""
    args, kwargs = make_inputs(Case(2, 3, 4, 5, 5, k=2), requires_grad=False)
    x, gates, weight, bias, gw, gb, rm, rv = args
    with pytest.raises(RuntimeError, match=r"gates .* must be \[N=2, K=2\]"):
        torch.ops.fastblock_ext.forward(x, gates[:, :1], weight, bias, gw, gb, rm, rv, True, 0.1, 1e-5, 1, 1, 1, False)
    with pytest.raises(RuntimeError, match="x must be 4-D"):
        torch.ops.fastblock_ext.forward(x[0], gates, weight, bias, gw, gb, rm, rv, True, 0.1, 1e-5, 1, 1, 1, False)
    with pytest.raises(RuntimeError, match="share one dtype"):
        torch.ops.fastblock_ext.forward(x, gates.double(), weight, bias, gw, gb, rm, rv, True, 0.1, 1e-5, 1, 1, 1,
                                        False)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("forced", [None, "mix", "concat"], ids=["auto", "mix", "concat"])
def test_extension_ops_pass_opcheck(layout, forced):
    """torch.library.opcheck: schema, fake kernel (shapes, dtypes, strides -- the saved z's too, which depends
    on the device and layout), and mutation declarations agree with the real kernel, for every schedule."""
    args, kwargs = make_inputs(Case(2, 3, 4, 5, 5, k=2), requires_grad=False)
    x, gates, weight, bias, gw, gb, rm, rv = args
    x = x.contiguous(memory_format=layout)
    code = {None: -1, "mix": 0, "concat": 1}[forced]
    torch.library.opcheck(torch.ops.fastblock_ext.forward.default,
                          (x, gates, weight, bias, gw, gb, rm, rv, True, 0.1, 1e-5, 1, 1, 1, True, 0, False, code),
                          test_utils=("test_schema", "test_faketensor"))
    with fastblock.force_schedule(forced):
        torch.library.opcheck(torch.ops.fastblock.mixed_conv_bn_relu_fwd.default,
                              (x, gates, weight, bias, gw, gb, rm, rv, True, 0.1, 1e-5, 1, 1, 1, True, "relu",
                               False, "extension"),
                              test_utils=("test_schema", "test_faketensor"))


# The CPU op runs channels-last inputs channels-last end to end (row kernels, concatenation schedule). Shapes
# that exercise the row kernels' vector body and tail (C = 5, 19, 40 against 8/16-lane vectors), K=1, stride 2,
# Cin != Cout, 1x1 and 5x5 kernels, one sample, one output pixel per sample.
CHANNELS_LAST_SHAPES = [
    Case(3, 5, 19, 7, 6, k=3, channels_last=True),
    Case(2, 19, 40, 5, 5, k=1, stride=2, channels_last=True),
    Case(1, 16, 17, 6, 7, k=2, ksize=5, bias=False, channels_last=True),
    Case(4, 3, 8, 4, 4, k=4, ksize=1, channels_last=True),
    Case(5, 6, 7, 3, 3, k=2, ksize=3, stride=2, channels_last=True),
]


@pytest.mark.parametrize("case", CHANNELS_LAST_SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_extension_channels_last_matches_reference(case, training, dtype):
    compare_with_reference("extension", case, dtype, training=training, seed=stable_seed(case, training) % 997)


@pytest.mark.parametrize("case", CHANNELS_LAST_SHAPES[:3], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_extension_channels_last_gradcheck_fp64(case, training):
    gradcheck_backend("extension", case, training=training)


@pytest.mark.parametrize("case", CHANNELS_LAST_SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_extension_channels_last_bf16(case, training):
    """bf16 (helpers.compare_low_precision): the row kernels as accurate as the NCHW path, and as the bf16
    reference."""
    compare_low_precision("extension", case, torch.bfloat16, training=training, baseline="extension",
                          baseline_case=dataclasses.replace(case, channels_last=False))
    compare_low_precision("extension", case, torch.bfloat16, training=training)


def test_extension_channels_last_eval_inference_folds_batchnorm():
    args, kwargs = make_inputs(CHANNELS_LAST_SHAPES[0], torch.float32, requires_grad=False)
    with torch.no_grad():
        y = fastblock.mixed_conv_bn_relu(*args, training=False, backend="extension", **kwargs)
    y_ref = fastblock.mixed_conv_bn_relu(*args, training=False, backend="reference", **kwargs)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("schedule", [-1, 0, 1], ids=["auto", "mix", "concat"])
def test_extension_channels_last_layouts(schedule):
    """Channels-last in, channels-last y, saved z and dx out on CPU, whichever schedule (a forced mixing schedule
    computes in NCHW and converts); the row kernels agree with the NCHW ones."""
    args, kwargs = make_inputs(Case(2, 3, 20, 5, 5, k=2), requires_grad=False)
    x, gates, weight, bias, gw, gb, rm, rv = args
    xl = x.contiguous(memory_format=torch.channels_last)
    y, z, _, _ = torch.ops.fastblock_ext.forward(xl, gates, weight, bias, gw, gb, rm.clone(), rv.clone(), True, 0.1,
                                                 1e-5, 1, 1, 1, True, 0, False, schedule)
    y0, z0, _, _ = torch.ops.fastblock_ext.forward(x, gates, weight, bias, gw, gb, rm.clone(), rv.clone(), True, 0.1,
                                                   1e-5, 1, 1, 1, True, 0, False, schedule)
    for t in (y, z):
        assert t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    torch.testing.assert_close(y, y0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z, z0, atol=1e-5, rtol=1e-5)
    dy = torch.randn_like(y0)
    grads = torch.ops.fastblock_ext.backward(dy.contiguous(memory_format=torch.channels_last), xl, gates, weight,
                                             bias, gw, gb, z, *torch.ops.fastblock_ext.forward(
                                                 xl, gates, weight, bias, gw, gb, None, None, True, 0.1, 1e-5, 1, 1,
                                                 1, True, 0, False, schedule)[2:], True, 1, 1, 1, 0, False,
                                             schedule)
    grads0 = torch.ops.fastblock_ext.backward(dy, x, gates, weight, bias, gw, gb, z0, *torch.ops.fastblock_ext.forward(
        x, gates, weight, bias, gw, gb, None, None, True, 0.1, 1e-5, 1, 1, 1, True, 0, False, schedule)[2:], True, 1,
        1, 1, 0, False, schedule)
    assert grads[0].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(grads, grads0):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_extension_deterministic():
    args, kwargs = make_inputs(Case(6, 8, 8, 7, 7, k=3), torch.float32)
    first = run_op("extension", args, kwargs, training=True)
    second = run_op("extension", args, kwargs, training=True)
    assert torch.equal(first[0], second[0])
    for name in first[1]:
        assert torch.equal(first[1][name], second[1][name]), name


def test_csrc_ships_inside_the_package(tmp_path):
    """A non-editable install carries csrc/ as fastblock/csrc, and the JIT build finds it there."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shipped = tmp_path / "fastblock" / "csrc"
    expected = sorted(p.name for p in (root / "csrc").iterdir() if p.suffix in (".cpp", ".cu", ".h"))
    assert sorted(p.name for p in shipped.iterdir()) == expected
    assert extension._find_csrc(tmp_path / "fastblock") == shipped
    assert extension._find_csrc(root / "fastblock") == root / "csrc"


def test_cuda_build_choice_on_a_gpu_machine(monkeypatch):
    """Where torch sees a GPU, whether to compile the CUDA sources depends on finding nvcc -- through
    torch.utils.cpp_extension, whose import must not ask the same question again (it recursed forever: every
    first use of the extension on a GPU machine failed)."""
    from fastblock import extension

    monkeypatch.delenv("FASTBLOCK_EXT_CUDA", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert extension._want_cuda() == (extension._nvcc() is not None)


def test_isa_level(monkeypatch):
    from fastblock.build_flags import ISA_FLAGS, isa_level

    monkeypatch.setenv("FASTBLOCK_EXT_ISA", "avx2")
    assert isa_level() == "AVX2" and "-mfma" in ISA_FLAGS["AVX2"]
    monkeypatch.setenv("FASTBLOCK_EXT_ISA", "sse9000")  # unknown levels build portable code
    assert isa_level() == "DEFAULT"
    monkeypatch.delenv("FASTBLOCK_EXT_ISA")
    expected = "AVX2" if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else "DEFAULT"
    assert isa_level() == expected


def test_extension_buffers_reused_across_shapes_and_dtypes():
    """Buffers recycled through the CPU pool: growing, shrinking and changing dtype between calls must not leak one
    call's data into the next."""
    for case, dtype in [(Case(3, 4, 5, 7, 6, k=2), torch.float32), (Case(6, 5, 9, 9, 8, k=3), torch.float32),
                        (Case(2, 3, 4, 5, 5, k=2), torch.float64), (Case(3, 4, 5, 7, 6, k=2), torch.float32),
                        (Case(8, 32, 24, 16, 16, k=2), torch.float32), (Case(8, 32, 24, 16, 16, k=2), torch.float64)]:
        compare_with_reference("extension", case, dtype, training=True)


# --- the opt-in CPU allocation pool (csrc/cpu_pool.cpp) --------------------------------------------------------
def test_cpu_pool_is_off_unless_asked_for():
    """Importing fastblock and running the op leaves the process's CPU allocator alone; FASTBLOCK_EXT_POOL_BYTES
    switches the pool on at the first op call."""
    import os

    probe = ("import torch, fastblock; from fastblock import extension; from helpers import Case, make_inputs;"
             "args, kw = make_inputs(Case(8, 32, 24, 16, 16, k=2));"
             "fastblock.mixed_conv_bn_relu(*args, backend='extension', **kw).sum().backward();"
             "print(extension.cpu_pool_stats())")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))
    env.pop("FASTBLOCK_EXT_POOL_BYTES", None)
    off = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert "'misses': 0" in off.stdout and "'limit_bytes': 0" in off.stdout, off.stdout + off.stderr
    env["FASTBLOCK_EXT_POOL_BYTES"] = str(64 << 20)
    on = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert f"'limit_bytes': {64 << 20}" in on.stdout and "'misses': 0" not in on.stdout, on.stdout + on.stderr


POOLED_CASE = Case(8, 32, 24, 16, 16, k=2)  # x, z, dz, ... are 200-260 KiB: above the pool's 64 KiB floor


@pytest.fixture
def pool():
    """The pool switched on (256 MiB) with an empty cache; the limit is restored afterwards (0: pools nothing)."""
    limit = extension.cpu_pool_stats()["limit_bytes"]
    extension.set_cpu_pool_limit(256 << 20)
    extension.cpu_pool_empty_cache()
    yield extension
    extension.set_cpu_pool_limit(limit)


def _pool_delta(before, after):
    return {k: after[k] - before[k] for k in ("hits", "misses", "live_blocks")}


def test_cpu_pool_recycles_the_op_memory_across_calls(pool):
    def detached_copy(run):  # copies made outside the op: the op's own output blocks are freed
        return run[0].clone(), {name: g.clone() for name, g in run[1].items()}

    args, kwargs = make_inputs(POOLED_CASE, torch.float32)
    first = detached_copy(run_op("extension", args, kwargs, training=True))
    s0 = pool.cpu_pool_stats()
    assert s0["misses"] > 0 and s0["cached_bytes"] > 0, s0
    second = detached_copy(run_op("extension", args, kwargs, training=True))  # same sizes: all from the cache
    s1 = pool.cpu_pool_stats()
    delta = _pool_delta(s0, s1)
    assert delta == {"hits": delta["hits"], "misses": 0, "live_blocks": 0} and delta["hits"] > 0, delta
    assert s1["cached_bytes"] <= s1["limit_bytes"]
    # recycled memory changes nothing: bit-identical to a run without the pool
    pool.set_cpu_pool_limit(0)
    unpooled = run_op("extension", args, kwargs, training=True)
    for a, b in [(second, first), (unpooled, first)]:
        assert torch.equal(a[0], b[0])
        for name in first[1]:
            assert torch.equal(a[1][name], b[1][name]), name


def test_cpu_pool_serves_only_the_op(pool):
    """Outside an op call the process allocates as before; the op's outputs are pooled blocks that return to the
    cache when freed, wherever that happens."""
    before = pool.cpu_pool_stats()
    outside = torch.empty(1 << 20)
    assert pool.cpu_pool_stats() == before
    args, kwargs = make_inputs(POOLED_CASE, torch.float32, requires_grad=False)
    y = fastblock.mixed_conv_bn_relu(*args, training=True, backend="extension", **kwargs)
    during = pool.cpu_pool_stats()
    assert during["live_blocks"] > before["live_blocks"]  # y
    del y
    after = pool.cpu_pool_stats()
    assert after["live_blocks"] == before["live_blocks"] and after["cached_bytes"] > before["cached_bytes"]
    del outside
    assert pool.cpu_pool_stats() == after


def test_cpu_pool_scope_serves_what_it_wraps(pool):
    """cpu_pool_scope() extends the pool to every large allocation of this thread inside it (the trainer wraps
    its steps): the second identical block is a cache hit; outside the scope, and with the pool off, nothing is
    pooled; scopes nest."""
    before = pool.cpu_pool_stats()
    with pool.cpu_pool_scope():
        a = torch.empty(1 << 20)
        del a
        with pool.cpu_pool_scope():
            b = torch.empty(1 << 20)
        assert _pool_delta(before, pool.cpu_pool_stats()) == {"hits": 1, "misses": 1, "live_blocks": 1}
        del b
        small = torch.empty(16)  # below the pooled size: malloc's own business
    after_scope = pool.cpu_pool_stats()
    assert _pool_delta(before, after_scope) == {"hits": 1, "misses": 1, "live_blocks": 0}
    outside = torch.empty(1 << 20)
    assert pool.cpu_pool_stats() == after_scope
    del outside, small


def test_cpu_pool_limit_and_empty_cache(pool):
    args, kwargs = make_inputs(POOLED_CASE, torch.float32)
    run_op("extension", args, kwargs, training=True)
    assert pool.cpu_pool_stats()["cached_bytes"] > 300 << 10
    pool.set_cpu_pool_limit(300 << 10)  # shrinking the limit evicts at once
    assert 0 < pool.cpu_pool_stats()["cached_bytes"] <= 300 << 10
    run_op("extension", args, kwargs, training=True)
    assert pool.cpu_pool_stats()["cached_bytes"] <= 300 << 10
    pool.cpu_pool_empty_cache()
    assert pool.cpu_pool_stats()["cached_bytes"] == 0
    pool.set_cpu_pool_limit(0)  # off: nothing pooled, nothing counted
    before = pool.cpu_pool_stats()
    run_op("extension", args, kwargs, training=True)
    assert _pool_delta(before, pool.cpu_pool_stats()) == {"hits": 0, "misses": 0, "live_blocks": 0}
    with pytest.raises(RuntimeError, match="limit must be >= 0"):
        pool.set_cpu_pool_limit(-1)


def test_cpu_pool_keeps_the_sizes_asked_for_last(pool):
    """When the sizes change (a run's first epochs on smaller images, then whole ones; an evaluation's batch), the
    cache gives back the blocks of the sizes asked for longest ago: with the old sizes still cached, the new ones do
    not fit the limit, yet after the first step of the new sizes every request is a hit."""
    mib = 1 << 20
    pool.set_cpu_pool_limit(8 * mib)

    def step(sizes):
        with pool.cpu_pool_scope():
            blocks = [torch.empty(n, dtype=torch.uint8) for n in sizes]
        del blocks  # (freed outside the scope: the blocks still go back to the cache)

    old = [mib + 4096 * i for i in range(5)]  # 5 MiB, then 5 MiB of other sizes: together over the 8 MiB limit
    new = [mib + 4096 * (i + 100) for i in range(5)]
    for sizes in (old, old, new):
        step(sizes)
    before = pool.cpu_pool_stats()
    for _ in range(3):
        step(new)
    assert _pool_delta(before, pool.cpu_pool_stats()) == {"hits": 15, "misses": 0, "live_blocks": 0}
    assert pool.cpu_pool_stats()["cached_bytes"] <= 8 * mib


def test_cpu_pool_forgets_the_sizes_it_holds_no_block_of(pool):
    """The last request of each size orders the eviction; sizes that come and go (a new batch size, odd shapes)
    must not grow that record for ever: it keeps the sizes held (cached or in use) and a bounded number of others."""
    pool.set_cpu_pool_limit(1 << 20)
    held = []
    with pool.cpu_pool_scope():
        for i in range(3000):
            block = torch.empty((64 << 10) + 64 * i, dtype=torch.uint8)
            if i % 1000 == 0:
                held.append(block)  # in use throughout: its size stays on record
            del block
    stats = pool.cpu_pool_stats()
    assert stats["live_blocks"] == 3 and stats["cached_bytes"] <= 1 << 20, stats
    assert stats["tracked_sizes"] <= 600, stats  # 3000 without the clean-up
    del held


def test_cpu_pool_concurrent_calls(pool):
    """Op calls on several threads at once (each thread pooled on its own, one shared cache), and outputs freed
    on other threads, give the single-threaded results and leave no block behind."""
    from concurrent.futures import ThreadPoolExecutor

    inputs = [make_inputs(POOLED_CASE, torch.float32, seed=s) for s in range(4)]
    expected = [run_op("extension", a, kw, training=True) for a, kw in inputs]
    before = pool.cpu_pool_stats()
    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(lambda i: [run_op("extension", *inputs[i % 4], training=True) for _ in range(3)],
                              range(8)))
    for i, runs in enumerate(results):
        for got in runs:
            assert torch.equal(got[0], expected[i % 4][0])
            for name in got[1]:
                assert torch.equal(got[1][name], expected[i % 4][1][name]), name
    del results, got, runs
    assert pool.cpu_pool_stats()["live_blocks"] == before["live_blocks"]


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork()")
def test_cpu_pool_usable_after_fork(pool):
    """A forked child (DataLoader workers) can free pooled tensors it inherited."""
    import os

    args, kwargs = make_inputs(POOLED_CASE, torch.float32, requires_grad=False)
    y = fastblock.mixed_conv_bn_relu(*args, training=True, backend="extension", **kwargs)
    live = pool.cpu_pool_stats()["live_blocks"]
    pid = os.fork()
    if pid == 0:  # child: no compute (OpenMP is not fork-safe), just the pool's bookkeeping
        del y
        os._exit(0 if pool.cpu_pool_stats()["live_blocks"] == live - 1 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_extension_default_cpu_chunks(monkeypatch):
    """The default CPU chunk budget (16 MiB of mixed kernels) splits 40 samples of 128->128 3x3 kernels
    (576 KiB each) into two chunks of 20 -- the mixing kernel then runs twice per chunk in forward (kernels and
    biases) -- and the chunked op still matches the reference."""
    monkeypatch.delenv("FASTBLOCK_EXT_CHUNK_BYTES", raising=False)
    case = Case(40, 128, 128, 9, 9, k=2)
    args, kwargs = make_inputs(case, torch.float32, requires_grad=False)
    with fastblock.force_schedule("mix"):
        compare_with_reference("extension", case, torch.float32, training=True)
        with torch.profiler.profile() as prof:
            fastblock.mixed_conv_bn_relu(*args, training=True, backend="extension", **kwargs)
    mix_calls = sum(e.count for e in prof.key_averages() if e.key == "fastblock_ext::mix")
    assert mix_calls == 4


def test_extension_eager_direct_call_matches_custom_ops(monkeypatch):
    """Eager mode calls the extension directly, skipping the custom-op layer (only torch.compile needs it): both
    routes run the same kernels, so outputs, all six gradients and the running statistics agree bit for bit,
    and both bump the running statistics' version counters as a declared mutation does."""
    from fastblock import ops
    args, kwargs = make_inputs(Case(3, 4, 5, 6, 7, k=2), torch.float32)
    results = {}
    for through_custom_ops in (False, True):
        monkeypatch.setattr(ops, "EAGER_THROUGH_CUSTOM_OPS", through_custom_ops)
        results[through_custom_ops] = run_op("extension", args, kwargs, training=True)  # on fresh copies of args
        running_mean, running_var = results[through_custom_ops][2:]
        assert running_mean._version > 0 and running_var._version > 0
    (y0, g0, rm0, rv0), (y1, g1, rm1, rv1) = results[False], results[True]
    assert torch.equal(y0, y1) and torch.equal(rm0, rm1) and torch.equal(rv0, rv1)
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name



def test_extension_under_fake_tensor_mode():
    check_fake_tensor_mode("extension")


def test_uninitialised_memory_is_nan_under_the_test_settings():
    """conftest's fill_uninitialized_memory reaches C++ allocations: the extension's at::empty dispatches to the same
    ATen kernel as aten::empty below, which fills floating tensors with NaN while the setting is on."""
    assert torch.utils.deterministic.fill_uninitialized_memory and torch.are_deterministic_algorithms_enabled()
    assert torch.isnan(torch.ops.aten.empty.memory_format([64])).all()
    assert torch.isnan(torch.empty_like(torch.zeros(3, 4))).all()


def test_ptxas_report_parsing():
    """The CUDA compile check reads registers, stack and spills per kernel and architecture from ptxas -v."""
    log = ("ptxas info    : Compiling entry function '_Z1aPf' for 'sm_90'\n"
           "ptxas info    : Function properties for _Z1aPf\n"
           "    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 40 registers, used 0 barriers, 360 bytes cmem[0]\n"
           "ptxas info    : Compiling entry function '_Z1bPf' for 'sm_100a'\n"
           "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
           "ptxas info    : Used 20 registers\n")
    table = extension.parse_ptxas(log)
    assert table["sm_90"] == [dict(kernel="_Z1aPf", registers=40, stack=16, spill_stores=8, spill_loads=4)]
    assert table["sm_100"][0]["registers"] == 20 and table["sm_100"][0]["spill_stores"] == 0


@pytest.fixture
def torch_threads():
    """Sets torch's intra-op thread count for a test and restores it after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs at least two intra-op threads")
def test_extension_cpu_kernels_run_on_torchs_threads(torch_threads):
    """at::parallel_for is a header template: compiled without -fopenmp it runs every CPU kernel on one thread,
    whatever torch's thread count (as the extension did until its build added OpenMP)."""
    from fastblock.build_flags import openmp

    if not openmp():
        pytest.skip("torch without OpenMP, or not Linux: the extension is built without it")
    threads = torch.get_num_threads()
    assert extension.cpu_threads() == threads
    torch_threads(1)
    assert extension.cpu_threads() == 1


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_extension_cpu_results_do_not_depend_on_the_thread_count(channels_last, dtype, torch_threads):
    """Every reduction adds fixed blocks in a fixed order: one thread and two give the same bits. The shape has
    several 128-row blocks per channel (the row kernels' unit of work) and several samples per thread."""
    case = Case(6, 24, 40, 9, 9, k=2, channels_last=channels_last)
    tolerance = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}
    args, kwargs = make_inputs(case, dtype, seed=stable_seed(case, "threads") % 1009)
    results = []
    for threads in (1, 2):
        torch_threads(threads)
        results.append(run_op("extension", args, kwargs, training=True))
    (y1, grads1, rm1, rv1), (y2, grads2, rm2, rv2) = results
    assert torch.equal(y1, y2) and torch.equal(rm1, rm2) and torch.equal(rv1, rv2)
    for name, one in grads1.items():
        if name == "weight":  # torch's convolution weight gradient (oneDNN) splits its reduction by thread
            torch.testing.assert_close(one, grads2[name], **tolerance[dtype])
        else:
            assert torch.equal(one, grads2[name]), f"d{name} differs between one thread and two"
