"""fastblock.max_pool2x2 / MaxPool2x2 (the extension's CPU 2x2 max-pooling) against F.max_pool2d / nn.MaxPool2d:
bit-identical outputs and input gradients, ties and NaN included."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastblock
from fastblock import extension
from fastblock.models import build_model
from helpers import stable_seed

_STATUS = fastblock.available_backends("cpu")["extension"]
pytestmark = pytest.mark.skipif(not _STATUS.available, reason=f"extension unavailable: {_STATUS.reason}")

# Odd and even sizes (an odd last row / column is dropped, its gradient is 0), one channel, more channels than a
# vector holds (vector body and tail), the smallest window, an empty batch.
SHAPES = [(3, 5, 7, 9), (2, 19, 6, 6), (2, 1, 5, 4), (1, 40, 3, 2), (1, 3, 2, 2), (0, 4, 4, 4)]
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _input(shape, dtype, layout, seed, ties=False, specials=False):
    gen = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: most windows hold their maximum more than once
        x = torch.randint(-2, 3, shape, generator=gen).to(dtype)
    else:
        x = torch.randn(shape, generator=gen).to(dtype)
    if specials and x.numel():
        flat = x.view(-1)
        picks = torch.randperm(flat.numel(), generator=gen)[: max(4, flat.numel() // 6)]
        values = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0], dtype=dtype)
        flat[picks] = values[torch.arange(len(picks)) % 4]
    return x.contiguous(memory_format=LAYOUTS[layout])


def _pool_and_grad(pool, x, grad):
    x = x.detach().clone().requires_grad_()
    y = pool(x)
    y.backward(grad)
    return y, x.grad


def _assert_same(ours, theirs):
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert torch.equal(ours.isnan(), theirs.isnan())
    assert torch.equal(torch.nan_to_num(ours), torch.nan_to_num(theirs))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("values", ["random", "ties", "nan_inf"])
def test_matches_aten(shape, layout, dtype, values):
    """Outputs and input gradients equal ATen's bit for bit: ties go to the first maximum in row-major order, a
    NaN wins (its own gradient), the layout of the input is kept."""
    seed = stable_seed(shape, layout, dtype, values) % 991
    x = _input(shape, dtype, layout, seed, ties=values == "ties", specials=values == "nan_inf")
    grad = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2,
                       generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    y, gx = _pool_and_grad(lambda t: fastblock.max_pool2x2(t, backend="extension"), x, grad)
    y_ref, gx_ref = _pool_and_grad(lambda t: F.max_pool2d(t, 2), x, grad)
    _assert_same(y, y_ref)
    _assert_same(gx, gx_ref)
    if x.numel() and shape[1] > 1:
        expected = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        assert y.is_contiguous(memory_format=expected) and gx.is_contiguous(memory_format=expected)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_views_and_strided_gradients(layout):
    """Non-contiguous input (a channel slice of a wider tensor, a transposed one) and a non-contiguous output
    gradient give ATen's results."""
    base = _input((3, 12, 9, 11), torch.float32, layout, seed=7)
    for x in (base[:, ::2], base.transpose(2, 3)[:, 1:7]):
        n, c, h, w = x.shape
        grad = torch.randn(n, c, w // 2, h // 2).transpose(2, 3)  # a transposed view of the right shape
        assert not x.is_contiguous() and not grad.is_contiguous()
        y, gx = _pool_and_grad(lambda t: fastblock.max_pool2x2(t, backend="extension"), x, grad)
        y_ref, gx_ref = _pool_and_grad(lambda t: F.max_pool2d(t, 2), x, grad)
        _assert_same(y, y_ref)
        _assert_same(gx, gx_ref)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_and_gradgradcheck_fp64(layout):
    x = _input((2, 3, 5, 6), torch.float64, layout, seed=11).requires_grad_()
    pool = lambda t: fastblock.max_pool2x2(t, backend="extension")  # noqa: E731
    assert torch.autograd.gradcheck(pool, (x,))
    assert torch.autograd.gradgradcheck(pool, (x,))


def test_the_extension_kernel_runs_only_where_asked():
    """CPU + extension (named or auto): the extension's op; backend="reference", a 3-d input or torch.no_grad
    without a gradient to keep: what they should be."""
    x = torch.randn(2, 3, 6, 6, requires_grad=True)

    def ran_kernel(fn):
        with torch.profiler.profile() as prof:
            fn()
        return any(e.key == "fastblock_ext::max_pool2x2" for e in prof.key_averages())

    assert ran_kernel(lambda: fastblock.max_pool2x2(x))
    assert ran_kernel(lambda: fastblock.max_pool2x2(x, backend="extension"))
    assert not ran_kernel(lambda: fastblock.max_pool2x2(x, backend="reference"))
    assert not ran_kernel(lambda: fastblock.max_pool2x2(x[0]))  # unbatched: F.max_pool2d
    assert torch.equal(fastblock.max_pool2x2(x[0]), F.max_pool2d(x[0], 2))
    y, argmax = extension.max_pool2x2(x.detach(), False)
    assert argmax.numel() == 0 and torch.equal(y, F.max_pool2d(x.detach(), 2))


def test_raw_ops_reject_bad_input_with_one_line():
    with pytest.raises(RuntimeError, match="expected a 4-d"):
        extension.max_pool2x2(torch.randn(3, 4, 4), True)
    with pytest.raises(RuntimeError, match="smaller than the 2x2 window"):
        extension.max_pool2x2(torch.randn(1, 2, 1, 4), True)
    with pytest.raises(RuntimeError, match="floating-point"):
        extension.max_pool2x2(torch.ones(1, 2, 4, 4, dtype=torch.int32), True)
    _, argmax = extension.max_pool2x2(torch.randn(1, 2, 4, 4), True)
    with pytest.raises(RuntimeError, match="does not pool to"):
        extension.max_pool2x2_backward(torch.randn(1, 2, 2, 2), argmax, 6, 4)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_raw_ops_pass_opcheck(layout):
    x = _input((2, 3, 5, 4), torch.float32, layout, seed=3)
    torch.library.opcheck(torch.ops.fastblock_ext.max_pool2x2.default, (x, True),
                          test_utils=("test_schema", "test_faketensor"))
    _, argmax = extension.max_pool2x2(x, True)
    torch.library.opcheck(torch.ops.fastblock_ext.max_pool2x2_backward.default,
                          (torch.randn(2, 3, 2, 2).contiguous(memory_format=LAYOUTS[layout]), argmax, 5, 4),
                          test_utils=("test_schema", "test_faketensor"))


def test_module_is_nn_maxpool2d():
    """MaxPool2x2 in a network of Blocks under bf16 autocast, channels-last (as the cpu preset trains): the same
    logits and gradients as the same network with nn.MaxPool2d(2)."""
    torch.manual_seed(5)
    ours = build_model("tiny", backend="extension").to(memory_format=torch.channels_last)
    theirs = build_model("tiny", backend="extension").to(memory_format=torch.channels_last)
    theirs.load_state_dict(ours.state_dict())
    swapped = 0
    for i, layer in enumerate(theirs.body):
        if isinstance(layer, fastblock.MaxPool2x2):
            theirs.body[i] = nn.MaxPool2d(2)
            swapped += 1
    assert swapped == 2 and "MaxPool2x2(backend='extension')" in repr(ours)
    x = torch.randn(6, 3, 12, 12).contiguous(memory_format=torch.channels_last)
    outs = []
    for model in (ours, theirs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().sum().backward()
        outs.append((out, [p.grad for p in model.parameters()]))
    assert torch.equal(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1], outs[1][1]):
        assert (a is None and b is None) or torch.equal(a, b)
    with pytest.raises(ValueError, match="backend must be one of"):
        fastblock.MaxPool2x2("cudnn")
