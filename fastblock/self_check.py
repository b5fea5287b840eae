"""The runtime self-check behind ``backend="auto"``: the first time a fused backend would be picked for a device and
dtype, it runs a tiny problem (forward and backward, train and eval; a few milliseconds) against the reference, in
that dtype with ReLU, and in float32 with the Block's other paths (GELU, and the 2x2 max-pool before BatchNorm).
If it raises or disagrees, ``auto`` marks it unavailable there with the reason, warns once and takes the next
backend: a kernel that is wrong on a user's GPU (an unsupported architecture, a compiler bug) is caught before it
trains a network. An explicitly requested backend is never replaced. ``FASTBLOCK_SELF_CHECK=0`` turns it off.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Optional

import torch

from .backend_utils import stats_dtype
from .reference import mixed_conv_bn_relu_reference

# (atol, rtol) against the float64 reference, relative to each tensor's largest magnitude
_TOLERANCE = {torch.float64: (1e-9, 1e-9), torch.float32: (2e-3, 2e-3), torch.bfloat16: (8e-2, 8e-2),
              torch.float16: (2e-2, 2e-2)}
# In 16-bit data a z within rounding of the ReLU threshold lands on the other side of it as often as not, which
# moves that element's gradient (and dx around it) by a whole term: a few such elements are allowed there, a
# wrong kernel is off nearly everywhere.
_OUTLIERS = {torch.bfloat16: 0.02, torch.float16: 0.02}
_results: dict[tuple[str, str, torch.dtype], Optional[str]] = {}


def enabled() -> bool:
    return os.environ.get("FASTBLOCK_SELF_CHECK", "1") != "0"


def failure(name: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None if the backend passed (or was never checked) on this device and dtype, else why it failed."""
    return _results.get((name, str(device), dtype))


def failures_on(name: str, device_type: str) -> Optional[str]:
    """The first recorded failure of ``name`` on any device of this type, for availability reports."""
    for (n, dev, dtype), reason in _results.items():
        if n == name and reason and torch.device(dev).type == device_type:
            return f"failed its self-check on {dev} ({str(dtype).replace('torch.', '')}): {reason}"
    return None


def passes(name: str, module, device: torch.device, dtype: torch.dtype) -> bool:
    """Run the check once per (backend, device, dtype); warn the first time it fails."""
    key = (name, str(device), dtype)
    if key not in _results:
        _results[key] = _run(module, device, dtype)
        if _results[key]:
            warnings.warn(f"fastblock: backend {name!r} failed its self-check on {device} "
                          f"({str(dtype).replace('torch.', '')}): {_results[key]}; backend='auto' uses the next "
                          "backend there (FASTBLOCK_SELF_CHECK=0 skips the check)", RuntimeWarning, stacklevel=4)
    return _results[key] is None


def _run(module, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    # The first call may come from anywhere (under no_grad, inference_mode or autocast): the check runs outside
    # all three, as its reference needs autograd and exact float64.
    try:
        with torch.inference_mode(False), torch.enable_grad(), _no_autocast(device), exact_fp32():
            for case_dtype, activation, pool in _cases(dtype):
                for training in (True, False):
                    why = check_case(module, device, case_dtype, training, n=3, cin=5, cout=6, h=6, w=5, k=2,
                                     activation=activation, pool=pool)
                    if why:
                        return why if (activation, pool) == ("relu", False) else f"({activation}, pool) {why}"
    except Exception as exc:  # a backend that raises fails the check; the reason is the message
        return f"raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    return None


@contextlib.contextmanager
def exact_fp32():
    """TF32 off for the duration: the check compares float32 with the exact answer, and the extension's cuDNN
    convolutions (like nn.Conv2d) follow ``torch.backends.cudnn.allow_tf32``, on by default."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _no_autocast(device: torch.device) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    for device_type in {"cpu", device.type}:
        stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def _cases(dtype: torch.dtype) -> tuple[tuple[torch.dtype, str, bool], ...]:
    """(dtype, activation, pool) of the checked problems: the requested dtype with ReLU, and the GELU epilogue with
    the pool in float32, where the reference's argmax is the backend's (in 16 bits, near-ties of a window rounded
    the other way route a gradient elsewhere: a whole term, as at the ReLU threshold)."""
    return ((dtype, "relu", False), (torch.float32 if dtype != torch.float64 else dtype, "gelu", True))


def check_case(module, device, dtype, training: bool, n: int, cin: int, cout: int, h: int, w: int,
               k: int, activation: str = "relu", pool: bool = False) -> Optional[str]:
    """One problem (3x3 kernels, stride 1) through a backend module's forward and backward against the float64
    reference on the CPU: None when it matches (output, running statistics, six gradients), else why not.
    ``activation`` / ``pool``: the op's arguments of the same name."""
    g = torch.Generator().manual_seed(1234)
    sdt = stats_dtype(dtype)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    exact = dict(x=rand(n, cin, h, w), gates=torch.softmax(rand(n, k), 1),
                 weight=rand(k, cout, cin, 3, 3, scale=(9 * cin) ** -0.5),
                 bias=rand(k, cout, scale=0.3), bn_weight=1 + 0.2 * rand(cout), bn_bias=0.1 * rand(cout))
    stats = (0.1 * rand(cout), 1 + 0.3 * rand(cout).abs())
    dy = rand(n, cout, *((h // 2, w // 2) if pool else (h, w))).to(dtype).double()
    # the exact answer for the inputs the backend gets: rounded to its dtypes first
    exact = {name: t.to(sdt if name.startswith("bn_") else dtype).double() for name, t in exact.items()}
    # the backend, in dtype (BatchNorm tensors in the statistics dtype)
    ins = {name: t.to(device, sdt if name.startswith("bn_") else dtype, copy=True) for name, t in exact.items()}
    rm, rv = (s.to(device, sdt, copy=True) for s in stats)  # updated in place: never the reference's copy
    y, z, mean, invstd = module.forward(ins["x"], ins["gates"], ins["weight"], ins["bias"], ins["bn_weight"],
                                        ins["bn_bias"], rm, rv, training, 0.1, 1e-5, 1, 1, 1, True, activation, pool)
    grads = module.backward(dy.to(device, y.dtype), ins["x"], ins["gates"], ins["weight"], ins["bias"],
                            ins["bn_weight"], ins["bn_bias"], z, mean, invstd, training, 1, 1, 1, True, True,
                            activation, pool)
    # the reference, in float64 on the CPU
    leaves = {name: t.clone().requires_grad_(True) for name, t in exact.items()}
    rm_ref, rv_ref = stats[0].clone(), stats[1].clone()
    y_ref = mixed_conv_bn_relu_reference(*leaves.values(), rm_ref, rv_ref, training, 0.1, 1e-5, 1, (1, 1),
                                         activation=activation, pool=pool)
    y_ref.backward(dy)
    atol, rtol = _TOLERANCE[dtype]
    checks = [("y", y, y_ref.detach()), ("running_mean", rm, rm_ref), ("running_var", rv, rv_ref)]
    checks += [(f"d{name}", grad, leaf.grad) for (name, leaf), grad in zip(leaves.items(), grads)]
    mode = "train" if training else "eval"
    for label, actual, expected in checks:
        actual = actual.detach().to("cpu", torch.float64)
        if actual.shape != expected.shape:
            return f"{label} ({mode}) has shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
        scale = max(1.0, expected.abs().max().item())
        err = (actual - expected).abs()
        bad = ~(err <= atol * scale + rtol * expected.abs())
        allowed = int(_OUTLIERS.get(dtype, 0.0) * bad.numel())
        if int(bad.sum()) > allowed or not torch.isfinite(actual).all():
            return (f"{label} ({mode}) differs from the reference at {int(bad.sum())} of {bad.numel()} elements "
                    f"(largest error {err.max().item():.3g})")
    return None
