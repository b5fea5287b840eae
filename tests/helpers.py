"""Shared comparison machinery: every backend is checked against the reference by the same code.

A backend's tests only name it: ``compare_with_reference("triton", case, ...)`` and ``gradcheck_backend(...)``.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Optional

import torch

import fastblock
from fastblock.reference import gated_conv_reference, mixed_conv_bn_reference, mixed_conv_bn_relu_reference


@dataclasses.dataclass(frozen=True)
class Case:
    n: int
    cin: int
    cout: int
    h: int
    w: int
    k: int
    ksize: int = 3
    stride: int = 1
    bias: bool = True
    channels_last: bool = False

    def __str__(self) -> str:
        return (f"N{self.n}-Cin{self.cin}-Cout{self.cout}-{self.h}x{self.w}-K{self.k}-k{self.ksize}-s{self.stride}"
                + ("" if self.bias else "-nobias") + ("-cl" if self.channels_last else ""))


# Tiny on purpose (the Triton interpreter runs them on CPU): odd sizes, H != W, stride 2, K=1, Cin != Cout,
# 1x1 and 5x5 kernels, N=1, no bias, channels_last.
SHAPES = [
    Case(2, 3, 5, 7, 6, k=3),
    Case(3, 4, 4, 5, 9, k=1, stride=2),
    Case(2, 5, 3, 8, 8, k=2, ksize=5, bias=False),
    Case(1, 2, 6, 6, 5, k=4, ksize=1),
    Case(4, 6, 7, 4, 4, k=6, stride=2, channels_last=True),
    Case(2, 3, 4, 9, 7, k=2, ksize=7),
]

TOLERANCES = {  # (atol, rtol) by precision; never loosened to make a backend pass
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (6e-2, 5e-2),
    torch.float16: (1e-2, 1e-2),
}


def stable_seed(*parts) -> int:
    """A seed per test case that is the same in every run (``hash()`` of a str changes with each process, so
    a failure would not reproduce)."""
    return zlib.crc32(repr(tuple(str(p) for p in parts)).encode())


def make_inputs(case: Case, dtype=torch.float32, device="cpu", seed: int = 0, requires_grad: bool = True,
                gate: str = "softmax"):
    """Random inputs for ``mixed_conv_bn_relu``: (args, kwargs). BN params in float32 unless dtype is float64."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dt)

    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    x = rand(case.n, case.cin, case.h, case.w)
    logits = rand(case.n, case.k, dt=torch.float64)
    gates = (torch.softmax(logits, 1) if gate == "softmax" else torch.sigmoid(logits)).to(dtype)
    fan_in = case.cin * case.ksize * case.ksize
    weight = rand(case.k, case.cout, case.cin, case.ksize, case.ksize, scale=fan_in ** -0.5)
    bias = rand(case.k, case.cout, scale=0.5) if case.bias else None
    bn_weight = (1.0 + 0.3 * rand(case.cout, dt=torch.float64)).to(sdt)
    bn_bias = (0.2 * rand(case.cout, dt=torch.float64)).to(sdt)
    running_mean = (0.1 * rand(case.cout, dt=torch.float64)).to(sdt)
    running_var = (1.0 + 0.5 * rand(case.cout, dt=torch.float64).abs()).to(sdt)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    tensors = [x, gates, weight, bias, bn_weight, bn_bias]
    tensors = [None if t is None else t.to(device).requires_grad_(requires_grad) for t in tensors]
    stats = [running_mean.to(device), running_var.to(device)]
    kwargs = dict(stride=case.stride, padding=case.ksize // 2)
    return tensors + stats, kwargs


# The op's differentiable arguments, in make_inputs' order.
ARG_NAMES = ("x", "gates", "weight", "bias", "bn_weight", "bn_bias")


def _clone(args):
    return [None if a is None else a.detach().clone().requires_grad_(a.requires_grad) for a in args]


# Relative to the largest |BatchNorm output|: closer than this to the ReLU threshold, an element may land on either
# side of it in the dtype's rounding (then its gradient, and dx around it, moves by a whole term).
KINK_MARGIN = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def away_from_kink(args, kwargs, training: bool, dtype, pool: bool = False) -> torch.Tensor:
    """Where the exact (float64) BatchNorm output is clear of the ReLU threshold -- and, with ``pool``, where each
    2x2 window's maximum is clear of its runner-up, so rounding cannot move the maximum to another position: the
    backward is compared with an upstream gradient that vanishes elsewhere, so it is a function of the inputs, not
    of rounding. A backward that mishandles the threshold or the routing still fails at every other element."""
    exact = [None if a is None else a.detach().to(torch.float64, copy=True) for a in args]
    pre = mixed_conv_bn_reference(*exact, training=training, momentum=0.1, eps=1e-5, stride=kwargs["stride"],
                                  padding=(kwargs["padding"],) * 2, pool=pool)
    keep = pre.abs() > KINK_MARGIN[dtype] * pre.abs().max()
    if pool:
        z = gated_conv_reference(*exact[:4], kwargs["stride"], (kwargs["padding"],) * 2)
        n, c, h, w = z.shape
        windows = z[:, :, :h // 2 * 2, :w // 2 * 2].unfold(2, 2, 2).unfold(3, 2, 2).reshape(n, c, h // 2, w // 2, 4)
        top2 = windows.topk(2, dim=-1).values
        keep &= (top2[..., 0] - top2[..., 1]) > KINK_MARGIN[dtype] * z.abs().max()
    return keep


def run_op(backend: Optional[str], args, kwargs, training: bool, momentum: float = 0.1, dy_keep=None,
           activation: str = "relu", pool: bool = False):
    """Forward + backward of one backend (None = the reference function itself). Returns every output.
    ``dy_keep``: a mask that zeroes the upstream gradient elsewhere (``away_from_kink``)."""
    args = _clone(args)
    if backend is None:
        y = mixed_conv_bn_relu_reference(*args, training=training, momentum=momentum, eps=1e-5,
                                         stride=kwargs["stride"], padding=(kwargs["padding"],) * 2,
                                         activation=activation, pool=pool)
    else:
        y = fastblock.mixed_conv_bn_relu(*args, training=training, momentum=momentum, eps=1e-5,
                                         backend=backend, activation=activation, pool=pool, **kwargs)
    g = torch.Generator().manual_seed(1234)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    if dy_keep is not None:
        dy = dy * dy_keep.to("cpu", torch.float64)
    y.backward(dy.to(y.dtype).to(y.device))
    grads = {name: (None if a is None or a.grad is None else a.grad)
             for name, a in zip(ARG_NAMES, args[:6])}
    return y.detach(), grads, args[6], args[7]


def assert_close(name, actual, expected, dtype, scale_by_max=False):
    atol, rtol = TOLERANCES[dtype]
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    if scale_by_max:  # low precision: error relative to the tensor's magnitude (sums of many rounded terms)
        atol = atol * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def compare_with_reference(backend: str, case: Case, dtype=torch.float32, device="cpu", training=True, seed=0,
                           reference_dtype=None, gate: str = "softmax", frozen: tuple[str, ...] = (),
                           activation: str = "relu", pool: bool = False):
    """Forward, all six gradients and the running statistics of ``backend`` against the reference.

    The reference runs in ``reference_dtype`` (default: float64 for low precision, else the same dtype) and is
    cast back, so low-precision backends are judged against the exact answer, not against another rounding.
    ``frozen``: arguments ("x", "gates", ...) that do not require grad -- they must get no gradient.
    """
    args, kwargs = make_inputs(case, dtype, device, seed, gate=gate)
    for name in frozen:
        args[ARG_NAMES.index(name)].requires_grad_(False)
    ref_dtype = reference_dtype or (torch.float64 if dtype in (torch.bfloat16, torch.float16) else dtype)
    ref_args = [None if a is None else a.detach().to(ref_dtype if a.dtype == dtype else
                                                    (torch.float64 if ref_dtype == torch.float64 else a.dtype))
                .requires_grad_(a.requires_grad) for a in args]
    keep = away_from_kink(args, kwargs, training, dtype, pool)
    y, grads, rm, rv = run_op(backend, args, kwargs, training, dy_keep=keep, activation=activation, pool=pool)
    y_ref, grads_ref, rm_ref, rv_ref = run_op(None, ref_args, kwargs, training, dy_keep=keep, activation=activation,
                                              pool=pool)
    low = dtype in (torch.bfloat16, torch.float16)
    assert_close("y", y, y_ref.to(y.dtype), dtype, scale_by_max=low)
    for name, grad in grads.items():
        if grads_ref[name] is None:
            assert grad is None, f"{name}: gradient given where the reference has none"
            continue
        assert grad is not None, f"{name}: no gradient"
        assert_close(f"d{name}", grad, grads_ref[name].to(grad.dtype), dtype, scale_by_max=True)
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert_close("running_mean", rm, rm_ref.to(rm.dtype), stat_dtype if not low else dtype)
    assert_close("running_var", rv, rv_ref.to(rv.dtype), stat_dtype if not low else dtype)


def compare_low_precision(backend: str, case: Case, dtype=torch.bfloat16, training=True, seeds=range(8),
                          factor=2.0, baseline="reference", baseline_case: Optional[Case] = None, device="cpu"):
    """A 16-bit backend is held to what 16-bit data allows: over several random problems (``seeds``), the median
    of the ratio of its mean absolute error to a baseline's, both against the float64 answer, is at most
    ``factor`` for y, each gradient and the running statistics. The baseline computes in the same dtype: the
    reference, or an established backend on the same values (``baseline_case``: e.g. the same case in NCHW).

    Elementwise tolerances cannot judge 16-bit results on small problems: a z within rounding of the ReLU
    threshold lands on either side of it depending on the summation order, moving a few gradient elements by a
    whole term each, and dot products with heavy cancellation (the gate gradients over a few samples) lose
    most of their digits -- the reference itself fails such tolerances. One problem's error ratio is noisy
    (0.3x to 7x between seeds at these sizes); the median over problems is not, and a wrong kernel moves it."""
    ratios: dict[str, list[float]] = {}
    for seed in seeds:
        args, kwargs = make_inputs(case, dtype, device, seed)
        exact = [None if a is None else a.detach().double().requires_grad_(a.requires_grad) for a in args]
        base_args, base_kwargs = make_inputs(baseline_case or case, dtype, device, seed)
        runs = [run_op(backend, args, kwargs, training), run_op(baseline, base_args, base_kwargs, training),
                run_op(None, exact, kwargs, training)]
        mine, theirs, answer = ({"y": y, **{f"d{k}": v for k, v in grads.items() if v is not None},
                                 "running_mean": rm, "running_var": rv} for y, grads, rm, rv in runs)
        assert mine.keys() == answer.keys(), (sorted(mine), sorted(answer))
        for name, expected in answer.items():
            expected = expected.double()
            assert torch.isfinite(mine[name]).all(), f"{name}: non-finite values (seed {seed})"
            floor = torch.finfo(dtype).eps * expected.abs().mean().item() + 1e-30
            err = (mine[name].double() - expected).abs().mean().item()
            base = (theirs[name].double() - expected).abs().mean().item()
            ratios.setdefault(name, []).append((err + floor) / (base + floor))
    for name, values in ratios.items():
        median = sorted(values)[len(values) // 2]
        assert median <= factor, f"{name}: mean error {median:.2f}x the {dtype} {baseline}'s (median over " \
                                 f"{len(values)} problems; each: {[round(v, 2) for v in values]})"


def gradcheck_backend(backend: str, case: Case, training=True, device="cpu", seed=0, fast_mode=False,
                      gate: str = "softmax", activation: str = "relu", pool: bool = False):
    """float64 gradcheck of every differentiable input through ``backend``.

    ``fast_mode`` checks v^T J u on random directions instead of the full Jacobian (for the slow interpreter).
    """
    args, kwargs = make_inputs(case, torch.float64, device, seed, gate=gate)
    rm, rv = args[6], args[7]
    diff = [a for a in args[:6] if a is not None]
    positions = [i for i, a in enumerate(args[:6]) if a is not None]

    def fn(*inputs):
        full = list(args[:6])
        for i, t in zip(positions, inputs):
            full[i] = t
        return fastblock.mixed_conv_bn_relu(*full, rm.clone(), rv.clone(), training=training, backend=backend,
                                            activation=activation, pool=pool, **kwargs)

    assert torch.autograd.gradcheck(fn, diff, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=fast_mode)


def check_fake_tensor_mode(backend: str):
    """FakeTensors (shape propagation, memory estimation, tracing tools) must reach a backend's fake kernels in
    eager mode too -- the custom-op route -- never its real kernels; forward and backward."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    case = Case(3, 4, 5, 6, 7, k=2, stride=2)
    args, kwargs = make_inputs(case, torch.float32)
    mode = FakeTensorMode()
    fake = [None if a is None else mode.from_tensor(a) for a in args]
    with mode:
        y = fastblock.mixed_conv_bn_relu(*fake, training=True, backend=backend, **kwargs)
        y.sum().backward()
    assert isinstance(y, FakeTensor) and tuple(y.shape) == (3, 5, 3, 4)
    assert tuple(fake[2].grad.shape) == tuple(args[2].shape)
