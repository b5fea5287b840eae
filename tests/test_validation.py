"""Bad input gets a clear error naming the argument, never a crash inside a kernel."""
import pytest
import torch

import fastblock
from fastblock import mixed_conv_bn_relu
from helpers import Case, make_inputs

BACKENDS = fastblock.backend_names()


def _args():
    args, _ = make_inputs(Case(2, 3, 4, 5, 5, k=2), requires_grad=False)
    return args


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "mutate, error, pattern",
    [
        (lambda a: a.__setitem__(0, a[0][0]), ValueError, r"x must be 4-D"),
        (lambda a: a.__setitem__(1, a[1][:, :1]), ValueError, r"K mismatch: gates \(2, 1\)"),
        (lambda a: a.__setitem__(1, a[1][:1]), ValueError, r"gates has 1 rows but x has batch size 2"),
        (lambda a: a.__setitem__(2, a[2][:, :, :2]), ValueError, r"Cin mismatch"),
        (lambda a: a.__setitem__(2, a[2][0]), ValueError, r"weight must be 5-D"),
        (lambda a: a.__setitem__(3, a[3][:, :3]), ValueError, r"bias must have shape \(K, Cout\)"),
        (lambda a: a.__setitem__(4, a[4][:3]), ValueError, r"bn_weight must have shape"),
        (lambda a: a.__setitem__(7, None), ValueError, r"running_mean and running_var must be given together"),
        (lambda a: a.__setitem__(2, a[2].double()), TypeError, r"weight has dtype torch.float64 but x has"),
        (lambda a: a.__setitem__(0, a[0].int()), TypeError, r"x must be a floating tensor"),
        (lambda a: a.__setitem__(4, a[4].half()), TypeError, r"bn_weight has dtype torch.float16"),
        (lambda a: a.__setitem__(0, a[0][:0]), ValueError, r"(empty batch|gates has 2 rows)"),
        (lambda a: a.__setitem__(1, a[1].tolist()), TypeError, r"gates must be a torch.Tensor"),
    ],
)
def test_bad_arguments(backend, mutate, error, pattern):
    args = _args()
    mutate(args)
    with pytest.raises(error, match=pattern):
        mixed_conv_bn_relu(*args, backend=backend)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(stride=0), "stride must be an int >= 1"),
    (dict(stride=1.5), "stride must be an int >= 1"),
    (dict(padding=-1), "padding must be >= 0"),
    (dict(padding="same"), "padding must be None"),
    (dict(momentum=1.5), "momentum must be in"),
    (dict(eps=0.0), "eps must be > 0"),
])
def test_bad_options(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        mixed_conv_bn_relu(*_args(), backend="reference", **kwargs)


def test_empty_batch():
    args, _ = make_inputs(Case(1, 3, 4, 5, 5, k=2), requires_grad=False)
    args[0], args[1] = args[0][:0], args[1][:0]
    with pytest.raises(ValueError, match="empty batch"):
        mixed_conv_bn_relu(*args)


def test_one_value_per_channel_in_training():
    args, _ = make_inputs(Case(1, 3, 4, 1, 1, k=2, ksize=1), requires_grad=False)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        mixed_conv_bn_relu(*args, training=True)
    # eval mode with running statistics is fine for N=1, 1x1
    assert mixed_conv_bn_relu(*args, training=False, backend="reference").shape == (1, 4, 1, 1)


def test_input_too_small_for_kernel():
    args, _ = make_inputs(Case(2, 3, 4, 2, 2, k=1, ksize=5), requires_grad=False)
    with pytest.raises(ValueError, match="too small"):
        mixed_conv_bn_relu(*args, padding=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_devices():
    args = _args()
    args[2] = args[2].cuda()
    with pytest.raises(RuntimeError, match="weight is on cuda"):
        mixed_conv_bn_relu(*args)


def test_mixed_devices_meta():
    args = _args()
    args[2] = args[2].to("meta")
    with pytest.raises(RuntimeError, match="weight is on meta"):
        mixed_conv_bn_relu(*args)
