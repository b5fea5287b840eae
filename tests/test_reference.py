"""The reference op against independent formulations, and its gradients."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastblock.reference import mixed_conv_bn_relu_reference
from helpers import SHAPES, Case, make_inputs, run_op


def modules_formulation(case, args, training):
    """Built from nn.Conv2d / nn.BatchNorm2d modules: the coursework code path."""
    x, gates, weight, bias, bn_w, bn_b, rm, rv = args
    convs = []
    for k in range(case.k):
        conv = nn.Conv2d(case.cin, case.cout, case.ksize, stride=case.stride, padding=case.ksize // 2,
                         bias=bias is not None).to(x.dtype)
        # Swap the module's parameters for our tensors so gradients flow back to them.
        del conv.weight
        conv.weight = weight[k]
        if bias is not None:
            del conv.bias
            conv.bias = bias[k]
        convs.append(conv)
    bn = nn.BatchNorm2d(case.cout).to(bn_w.dtype)
    del bn.weight, bn.bias
    bn.weight, bn.bias = bn_w, bn_b
    with torch.no_grad():
        bn.running_mean.copy_(rm)
        bn.running_var.copy_(rv)
    bn.train(training)
    mixed = sum(gates[:, k, None, None, None] * convs[k](x) for k in range(case.k))
    return torch.relu(bn(mixed)), bn.running_mean, bn.running_var


def dynamic_conv_formulation(case, args, training):
    """The other algebra: per-sample mixed kernels and one grouped convolution (groups=N)."""
    x, gates, weight, bias, bn_w, bn_b, rm, rv = [None if a is None else a.detach().clone() for a in args]
    n = x.shape[0]
    mixed_w = torch.einsum("nk,koihw->noihw", gates, weight).reshape(n * case.cout, case.cin, case.ksize, case.ksize)
    mixed_b = None if bias is None else (gates @ bias).reshape(-1)
    z = F.conv2d(x.reshape(1, n * case.cin, case.h, case.w), mixed_w, mixed_b, stride=case.stride,
                 padding=case.ksize // 2, groups=n)
    z = z.reshape(n, case.cout, z.shape[-2], z.shape[-1])
    return torch.relu(F.batch_norm(z, rm, rv, bn_w, bn_b, training, 0.1, 1e-5)), rm, rv


@pytest.mark.parametrize("case", SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_reference_matches_modules_and_dynamic_conv(case, training):
    args, kwargs = make_inputs(case, torch.float64, seed=hash(str(case)) % 1000, requires_grad=False)
    ref_rm, ref_rv = args[6].clone(), args[7].clone()
    y = mixed_conv_bn_relu_reference(*args[:6], ref_rm, ref_rv, training, 0.1, 1e-5, case.stride,
                                     (case.ksize // 2,) * 2)
    y_mod, rm_mod, rv_mod = modules_formulation(case, [a.clone() if a is not None else None for a in args], training)
    y_dyn, rm_dyn, rv_dyn = dynamic_conv_formulation(case, args, training)
    for other, orm, orv in ((y_mod, rm_mod, rv_mod), (y_dyn, rm_dyn, rv_dyn)):
        torch.testing.assert_close(y, other.detach(), atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(ref_rm, orm.detach(), atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(ref_rv, orv.detach(), atol=1e-12, rtol=1e-12)
    if training:  # running stats really moved, with the unbiased variance
        assert not torch.equal(ref_rm, args[6])


def test_reference_running_var_is_unbiased():
    case = Case(3, 2, 2, 3, 3, k=1, ksize=1)
    args, kwargs = make_inputs(case, torch.float64, requires_grad=False)
    rm, rv = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    mixed_conv_bn_relu_reference(*args[:6], rm, rv, True, 1.0, 1e-5, 1, (0, 0))
    x, gates, weight, bias = args[:4]
    z = gates[:, 0, None, None, None] * (F.conv2d(x, weight[0], bias[0]))
    torch.testing.assert_close(rv, z.var(dim=(0, 2, 3), unbiased=True))
    torch.testing.assert_close(rm, z.mean(dim=(0, 2, 3)))


@pytest.mark.parametrize("case", SHAPES[:3], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_reference_gradcheck(case, training):
    from helpers import gradcheck_backend

    gradcheck_backend("reference", case, training=training)


def test_reference_gradients_match_modules():
    case = SHAPES[0]
    args, kwargs = make_inputs(case, torch.float64, seed=3)
    y, grads, _, _ = run_op("reference", args, kwargs, training=True)
    leaves = [a.detach().clone().requires_grad_(True) if a is not None else None for a in args[:6]]
    y_mod, _, _ = modules_formulation(case, leaves + [args[6].clone(), args[7].clone()], True)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
    y_mod.backward(dy)
    for name, leaf in zip(["x", "gates", "weight", "bias", "bn_weight", "bn_bias"], leaves):
        torch.testing.assert_close(grads[name], leaf.grad, atol=1e-10, rtol=1e-9)
