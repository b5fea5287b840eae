"""fastblock.Block: equivalences, state_dict, backend switching, compile, autocast, channels_last."""
import pytest
import torch
import torch.nn as nn

import fastblock
from fastblock import Block

FUSED = [name for name in fastblock.backend_names() if fastblock.get_backend(name).fused]


@pytest.mark.parametrize("pool", [False, True], ids=["", "pool"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("backend", ["reference", *(n for n in FUSED if fastblock.available_backends("cpu")[n].available
                                                    and n != "triton")])
def test_k1_block_equals_conv_bn_activation(activation, backend, pool):
    """A K=1 Block is nn.Conv2d -> [nn.MaxPool2d(2) with pool=True] -> nn.BatchNorm2d -> activation, in training and
    eval mode, with negative BatchNorm scales too (eval mode must not fold BatchNorm into the convolution ahead of a
    max-pool: the max of a negatively scaled map is not the scaled max)."""
    torch.manual_seed(1)
    block = Block(3, 5, num_convs=1, kernel_size=3, stride=2, activation=activation, pool=pool,
                  backend=backend).double()
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1).double()
    bn = nn.BatchNorm2d(5).double()
    with torch.no_grad():
        conv.weight.copy_(block.weight[0])
        conv.bias.copy_(block.bias[0])
        bn.weight.uniform_(0.5, 1.5)
        bn.weight[::2].neg_()
        bn.bias.uniform_(-0.5, 0.5)
        block.bn.weight.copy_(bn.weight)
        block.bn.bias.copy_(bn.bias)
    x = torch.randn(4, 3, 9, 7, dtype=torch.float64)
    for training in (True, False):
        block.train(training)
        bn.train(training)
        act = nn.GELU() if activation == "gelu" else nn.ReLU()
        pooled = nn.MaxPool2d(2) if pool else nn.Identity()
        for no_grad in (False, True):  # eval without autograd: the inference path
            with torch.set_grad_enabled(not no_grad):
                y = block(x)
            torch.testing.assert_close(y, act(bn(pooled(conv(x)))), atol=1e-12, rtol=1e-12)
            if training:
                break  # (a second training step would move the running statistics again)
    torch.testing.assert_close(block.bn.running_var, bn.running_var)
    assert int(block.bn.num_batches_tracked) == int(bn.num_batches_tracked) == 1


def test_block_rejects_an_unknown_activation():
    with pytest.raises(ValueError, match="activation must be one of"):
        Block(3, 5, activation="tanh")
    x, gates, weight = torch.randn(1, 3, 4, 4), torch.ones(1, 1), torch.randn(1, 5, 3, 3, 3)
    with pytest.raises(ValueError, match="activation must be one of"):
        fastblock.mixed_conv_bn_relu(x, gates, weight, activation="silu")


def test_block_init_matches_conv2d_bounds():
    block = Block(16, 8, num_convs=3, kernel_size=[5, 3, 3])
    for k, size in enumerate([5, 3, 3]):
        bound = 1 / (16 * size * size) ** 0.5
        assert block.weight[k].abs().max() <= bound
        assert block.weight[k].abs().max() > 0.8 * bound
    # 3x3 branches are zero-embedded in the 5x5 grid
    assert block.weight[1, :, :, 0].abs().sum() == 0 and block.weight[1, :, :, :, 4].abs().sum() == 0


def test_mixed_kernel_embedding_stays_zero_during_training():
    torch.manual_seed(0)
    block = Block(4, 6, num_convs=4, kernel_size=[5, 5, 3, 3], backend="reference")
    opt = torch.optim.SGD(block.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    x = torch.randn(6, 4, 8, 8)
    for _ in range(3):
        opt.zero_grad()
        block(x).square().mean().backward()
        opt.step()
    outside = block.weight[2:].clone()
    outside[:, :, :, 1:4, 1:4] = 0
    assert outside.abs().max() == 0
    assert block.weight[0, :, :, 0].abs().sum() > 0  # the 5x5 branches really use their border


@pytest.mark.parametrize("gate", ["softmax", "sigmoid", "relu", "none"])
def test_gate_functions(gate):
    block = Block(4, 4, num_convs=3, gate=gate, temperature=2.0)
    x = torch.randn(5, 4, 6, 6)
    a = block.gates(x)
    assert a.shape == (5, 3)
    if gate == "softmax":
        torch.testing.assert_close(a.sum(1), torch.ones(5))
        logits = block.gate_layer(x.mean((2, 3)))
        torch.testing.assert_close(a, torch.softmax(logits / 2.0, 1))
    elif gate == "sigmoid":
        assert ((a > 0) & (a < 1)).all()
    elif gate == "relu":
        assert (a >= 0).all()
    else:
        assert torch.equal(a, torch.ones(5, 3))


def test_mlp_gate():
    block = Block(8, 8, num_convs=6, gate_hidden=(16, 16))
    assert isinstance(block.gate_layer, nn.Sequential) and len(block.gate_layer) == 5
    assert block(torch.randn(2, 8, 4, 4)).shape == (2, 8, 4, 4)


def test_state_dict_round_trip_and_backend_switch(tmp_path):
    block = Block(4, 6, num_convs=3, kernel_size=3, backend="reference")
    keys = set(block.state_dict())
    for name in fastblock.BACKENDS:
        block.backend = name
        assert set(block.state_dict()) == keys
    block.backend = "reference"
    x = torch.randn(3, 4, 5, 5)
    block(x)  # moves running stats
    torch.save(block.state_dict(), tmp_path / "b.pt")
    other = Block(4, 6, num_convs=3, kernel_size=3, backend="auto")
    other.load_state_dict(torch.load(tmp_path / "b.pt", weights_only=True))
    block.eval(), other.eval()
    torch.testing.assert_close(block(x), other(x))
    with pytest.raises(ValueError, match="backend must be one of"):
        block.backend = "cudnn"


def test_extra_repr():
    text = repr(Block(4, 6, num_convs=5, kernel_size=[5, 3, 3, 3, 3], gate="sigmoid", backend="reference"))
    assert "num_convs=5" in text and "kernel_size=[5, 3, 3, 3, 3]" in text
    assert "gate='sigmoid'" in text and "backend='reference'" in text and "pool" not in text
    assert "pool=True" in repr(Block(4, 6, pool=True))


def test_pool_block_shapes_and_errors():
    """pool=True halves the convolution's output (rounded down, as nn.MaxPool2d(2)); a convolution output below 2x2
    cannot be pooled, and a pooled batch of one pixel has no batch statistics: both clear errors."""
    block = Block(3, 4, num_convs=2, pool=True, backend="reference")
    assert block(torch.randn(2, 3, 7, 6)).shape == (2, 4, 3, 3)
    assert Block(3, 4, num_convs=2, stride=2, pool=True)(torch.randn(2, 3, 9, 9)).shape == (2, 4, 2, 2)
    with pytest.raises(ValueError, match="at least 2x2"):
        block(torch.randn(2, 3, 1, 5))
    with pytest.raises(ValueError, match="more than 1 value per channel, got pooled"):
        block(torch.randn(1, 3, 3, 3))


def test_block_bad_input_message():
    with pytest.raises(ValueError, match=r"expects input \[N, 4, H, W\]"):
        Block(4, 4)(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match="odd"):
        Block(4, 4, kernel_size=4)
    with pytest.raises(ValueError, match="kernel_size lists"):
        Block(4, 4, num_convs=3, kernel_size=[3, 5])
    for channels in ((0, 4), (4, 0)):  # (not a division by zero in the weights' initialisation)
        with pytest.raises(ValueError, match="in_channels and out_channels must be >= 1"):
            Block(*channels)


@pytest.mark.parametrize("variant", [{}, {"activation": "gelu", "pool": True}], ids=["relu", "gelu-pool"])
@pytest.mark.parametrize("backend", ["reference", "extension"])
def test_block_compiles_fullgraph(backend, variant):
    if not fastblock.available_backends("cpu")[backend].available:
        pytest.skip(f"{backend} unavailable: {fastblock.available_backends('cpu')[backend].reason}")
    torch.manual_seed(0)
    block = Block(4, 6, num_convs=3, stride=2, backend=backend, **variant)
    eager = Block(4, 6, num_convs=3, stride=2, backend=backend, **variant)
    eager.load_state_dict(block.state_dict())
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager" if backend != "reference" else "inductor")
    x = torch.randn(5, 4, 9, 8)
    y_c, y_e = compiled(x), eager(x)
    torch.testing.assert_close(y_c, y_e, atol=1e-5, rtol=1e-5)
    y_c.sum().backward()
    y_e.sum().backward()
    torch.testing.assert_close(block.weight.grad, eager.weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(block.bn.running_mean, eager.bn.running_mean)  # the mutation happened
    assert int(block.bn.num_batches_tracked) == 1


@pytest.mark.parametrize("backend", ["reference", "extension"])
def test_autocast_bf16(backend):
    if not fastblock.available_backends("cpu")[backend].available:
        pytest.skip(f"{backend} unavailable")
    block = Block(4, 6, num_convs=3, backend=backend)
    x = torch.randn(4, 4, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x)
    assert y.dtype == torch.bfloat16
    assert block.bn.running_mean.dtype == torch.float32
    y.float().sum().backward()
    assert block.weight.grad.dtype == torch.float32
    ref = Block(4, 6, num_convs=3, backend="reference")
    ref.load_state_dict(block.state_dict())
    ref.bn.running_mean.zero_(), ref.bn.running_var.fill_(1)
    torch.testing.assert_close(y.float(), ref(x), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("backend", ["reference", "extension"])
def test_channels_last_block(backend):
    if not fastblock.available_backends("cpu")[backend].available:
        pytest.skip(f"{backend} unavailable")
    block = Block(4, 6, num_convs=2, backend=backend).to(memory_format=torch.channels_last)
    x = torch.randn(3, 4, 7, 5).contiguous(memory_format=torch.channels_last)
    y = block(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    block.backend = "reference"
    block.bn.reset_running_stats()
    torch.testing.assert_close(y, block(x.contiguous()), atol=1e-5, rtol=1e-5)


def test_non_contiguous_input():
    block = Block(4, 6, num_convs=2, backend="reference")
    x = torch.randn(3, 7, 4, 6).transpose(1, 2)  # [3, 4, 7, 6] non-contiguous
    assert not x.is_contiguous()
    torch.testing.assert_close(block(x), block(x.contiguous()))


def _second_order_grads(backend, loss_of_y, training):
    """Gradient penalty through a Block: d/dtheta || d loss / dx ||^2 for every parameter and x."""
    torch.manual_seed(0)
    block = Block(3, 4, num_convs=2, backend=backend).double().train(training)
    if not training:
        block.bn.running_mean.uniform_(-0.3, 0.3)
        block.bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    (gx,) = torch.autograd.grad(loss_of_y(block(x)), x, create_graph=True)
    gx.square().sum().backward()
    return [x.grad] + [p.grad for p in block.parameters()]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("loss", ["square", "sum", "mean"])
def test_double_backward_matches_reference(backend, training, loss):
    """Gradient penalties / Hessian-vector products through a fused backend give the reference's second-order
    gradients, also with a constant upstream gradient (y.sum(), y.mean()), where the op's backward is reached
    with a dy that needs no grad and only the gate path would otherwise carry the graph."""
    if not fastblock.available_backends("cpu")[backend].available:
        pytest.skip(f"{backend} unavailable: {fastblock.available_backends('cpu')[backend].reason}")
    fn = {"square": lambda y: y.square().sum(), "sum": lambda y: y.sum(), "mean": lambda y: y.mean()}[loss]
    expected = _second_order_grads("reference", fn, training)
    actual = _second_order_grads(backend, fn, training)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert (a is None) == (e is None), i
        if e is not None:
            torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("activation,pool", [("relu", False), ("gelu", False), ("relu", True)])
def test_double_backward_gradgradcheck(backend, activation, pool):
    """gradgradcheck of the op itself in float64 (every input, second order)."""
    if not fastblock.available_backends("cpu")[backend].available:
        pytest.skip(f"{backend} unavailable: {fastblock.available_backends('cpu')[backend].reason}")
    from helpers import Case, make_inputs

    args, kwargs = make_inputs(Case(2, 2, 3, 4, 3, k=2), torch.float64)
    rm, rv = args[6], args[7]

    def fn(*inputs):
        return fastblock.mixed_conv_bn_relu(*inputs, rm.clone(), rv.clone(), training=True, backend=backend,
                                            activation=activation, pool=pool, **kwargs)

    assert torch.autograd.gradgradcheck(fn, args[:6], atol=1e-6, rtol=1e-5, fast_mode=True)
