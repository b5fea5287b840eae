"""MuonSGD: Muon for the Blocks' filters, SGD for the rest, in one optimizer."""
import math

import pytest
import torch

from fastblock import train
from fastblock.models import MODELS, build_model
from fastblock.modules import Block
from fastblock.train.optim import MuonSGD, orthogonalize


@pytest.mark.parametrize("shape", [(64, 216), (256, 64), (3, 5, 40)])
def test_orthogonalize_keeps_the_singular_vectors_and_evens_the_singular_values(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    *batch, m, n = shape
    u, _, vh = torch.linalg.svd(torch.randn(*shape, generator=gen, dtype=torch.float64), full_matrices=False)
    s = torch.linspace(1.0, 0.25, min(m, n), dtype=torch.float64)  # singular values spread 4:1
    g = u @ torch.diag_embed(s.expand(*batch, -1)) @ vh
    o = orthogonalize(g).double()
    assert o.shape == g.shape
    # a polynomial in g g^T times g: g's singular vectors, with new singular values on the diagonal
    inner = u.mT @ o @ vh.mT
    diag = torch.diagonal(inner, dim1=-2, dim2=-1)
    off = inner - torch.diag_embed(diag)
    assert off.norm() < 1e-4 * diag.norm()
    assert diag.min() > 0.6 and diag.max() < 1.25  # near 1, whatever the input's spread


def _twin_params(seed, shapes):
    g = torch.Generator().manual_seed(seed)
    a = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    return a, b


def test_sgd_groups_step_exactly_as_torch_sgd():
    shapes = [(8, 4), (8,), (3, 2, 2)]
    mine, ref = _twin_params(0, shapes)
    opt = MuonSGD([{"params": mine[:2], "weight_decay": 1e-2}, {"params": mine[2:], "lr": 0.3}], lr=0.1,
                  momentum=0.85, nesterov=True)
    ref_opt = torch.optim.SGD([{"params": ref[:2], "weight_decay": 1e-2}, {"params": ref[2:], "lr": 0.3}], lr=0.1,
                              momentum=0.85, nesterov=True)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        for p, q in zip(mine, ref):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(mine, ref):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def _by_hand(w, grads, lr, momentum, nesterov):
    """The muon update written out for a [K, Cout, Cin, kh, kw] filter tensor, bank by bank."""
    w, buf = w.detach().clone(), None
    for grad in grads:
        buf = grad.clone() if buf is None else momentum * buf + grad
        u = grad + momentum * buf if nesterov else buf
        for k in range(w.shape[0]):
            bank = w[k].reshape(w.shape[1], -1)
            bank = bank * math.sqrt(w.shape[1]) / bank.norm()
            w[k] = (bank - lr * orthogonalize(u[k].reshape(w.shape[1], -1))).view_as(w[k])
    return w


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_group_normalises_each_bank_and_steps_along_its_orthogonalised_momentum(nesterov):
    shape = (3, 6, 4, 3, 3)  # K=3 banks of [6, 36]
    (w,), _ = _twin_params(2, [shape])
    start = w.detach().clone()
    bias = torch.nn.Parameter(torch.zeros(6))
    opt = MuonSGD([{"params": [w], "muon": True, "lr": 0.05, "momentum": 0.6},
                   {"params": [bias], "weight_decay": 0.1}], lr=0.1, momentum=0.9, nesterov=nesterov)
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(shape, generator=g) for _ in range(3)]
    for grad in grads:
        w.grad, bias.grad = grad.clone(), torch.zeros(6)
        opt.step()
        assert torch.equal(w.grad, grad)  # the gradient is still there after the step
    torch.testing.assert_close(w.detach(), _by_hand(start, grads, 0.05, 0.6, nesterov), rtol=1e-5, atol=1e-5)


def test_muon_group_with_lr_zero_only_rescales_and_ignores_weight_decay():
    w = torch.nn.Parameter(torch.randn(2, 8, 3, 3, 3) * 5)
    opt = MuonSGD([{"params": [w], "muon": True, "weight_decay": 0.5}], lr=0.0, momentum=0.9)
    direction = w.detach().reshape(2, 8, -1)
    w.grad = torch.randn_like(w)
    opt.step()
    banks = w.detach().reshape(2, 8, -1)
    torch.testing.assert_close(torch.linalg.matrix_norm(banks), torch.full((2,), math.sqrt(8)))
    torch.testing.assert_close(banks / banks.norm(dim=(1, 2), keepdim=True),
                               direction / direction.norm(dim=(1, 2), keepdim=True))


def test_muon_group_keeps_a_channels_last_filter_channels_last():
    w = torch.nn.Parameter(torch.randn(8, 4, 3, 3).contiguous(memory_format=torch.channels_last))
    opt = MuonSGD([{"params": [w], "muon": True}], lr=0.1, momentum=0.5)
    w.grad = torch.randn(8, 4, 3, 3)
    opt.step()
    assert w.is_contiguous(memory_format=torch.channels_last)
    assert torch.linalg.matrix_norm(w.detach().reshape(8, -1)) <= math.sqrt(8) + 0.1 * math.sqrt(8)


def test_muon_group_refuses_one_dimensional_parameters():
    with pytest.raises(ValueError, match="1-D parameter"):
        MuonSGD([{"params": [torch.nn.Parameter(torch.zeros(4))], "muon": True}], lr=0.1)


@pytest.mark.parametrize("name", ["tiny", "air-cpu-wide-k1-gelu", "air-cpu", "coursework-c"])
def test_make_optimizer_muon_puts_exactly_the_block_filters_in_the_muon_group(name):
    torch.manual_seed(0)
    model = build_model(name, backend="reference")
    cfg = dict(train.resolve_preset("cpu"), model=name, optimizer="muon", muon_lr=0.2, muon_momentum=0.6)
    opt = train.make_optimizer(cfg, model)
    assert isinstance(opt, MuonSGD)
    muon = [g for g in opt.param_groups if g["muon"]]
    assert len(muon) == 1 and muon[0]["lr"] == 0.2 and muon[0]["momentum"] == 0.6
    filters = {id(m.weight) for m in model.modules() if isinstance(m, Block)}
    assert {id(p) for p in muon[0]["params"]} == filters
    placed = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(placed) == sorted(id(p) for p in model.parameters() if p.requires_grad)  # each once
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([1, 2]))
    loss.backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the schedule scales the filters' lr as every other group's
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert muon[0]["lr"] == pytest.approx(0.1)


def test_every_model_has_block_filters_for_muon():
    for name in MODELS:
        model = build_model(name, backend="reference")
        assert any(isinstance(m, Block) for m in model.modules()), name
