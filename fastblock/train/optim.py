"""Muon for the Blocks' convolution filters, SGD for every other parameter, as one torch optimizer.

torch.optim.Muon takes 2-D parameters only; a Block's filters are [K, Cout, Cin, kh, kw] -- K filter banks, each a
[Cout, Cin*kh*kw] matrix. Muon replaces a bank's momentum update by its nearest semi-orthogonal matrix (a few
Newton-Schulz iterations), so every direction of the bank moves at the same rate however unevenly the gradient
spreads over them. A Block's convolution feeds a BatchNorm, so only the direction of a bank matters: its norm is
held at sqrt(Cout) and the learning rate sets the angle each step turns it by.
"""
from __future__ import annotations

import math

import torch

# Quintic Newton-Schulz coefficients that push every singular value in (0, 1] towards ~1 in few iterations (they
# are chosen for speed, not convergence: the result's singular values land in roughly [0.7, 1.2]).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


@torch.no_grad()
def orthogonalize(g: torch.Tensor, steps: int = 3) -> torch.Tensor:
    """An approximately semi-orthogonal matrix with the singular vectors of each matrix in ``g`` ([..., m, n]):
    U V^T of g = U S V^T, with S replaced by values near 1. Computed in float32 (the matrices are small)."""
    a, b, c = NS_COEFFICIENTS
    x = g.float()
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the wide side: the Gram matrix is the smaller one
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-7)  # Frobenius norm >= spectral norm: S in [0, 1]
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


class MuonSGD(torch.optim.SGD):
    """SGD (momentum, Nesterov, weight decay as torch.optim.SGD) for every group, except groups with
    ``muon=True``: their parameters are filter banks ([K, Cout, ...] or [Cout, ...]) followed by a normalisation
    layer. For those, each step: momentum buffer b <- momentum * b + grad; the update u = grad + momentum * b
    (Nesterov) or b, orthogonalised bank by bank; the bank rescaled to norm sqrt(Cout); then bank -= lr * u.
    Weight decay does not apply to them (the rescaling fixes their norm). In a Block of mixed kernel sizes the taps
    outside a smaller kernel move too, without effect (the Block masks them out), and count in its bank's norm.

    One optimizer for both kinds keeps LambdaLR, GradScaler and checkpoints unchanged: the learning-rate schedule
    scales every group's lr alike, and state_dict holds every momentum buffer."""

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                 ns_steps: int = 3):
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
        for group in self.param_groups:
            group.setdefault("muon", False)
            group.setdefault("ns_steps", ns_steps)
            if group["muon"]:
                for p in group["params"]:
                    if p.dim() < 2:
                        raise ValueError(f"MuonSGD: a muon group holds a {p.dim()}-D parameter; filter banks are "
                                         "at least 2-D")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        held = []  # the muon groups' gradients, hidden from SGD's step (it skips parameters without one)
        for group in self.param_groups:
            if not group["muon"]:
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._muon_update(p, group)
                held.append((p, p.grad))
                p.grad = None
        try:
            super().step()
        finally:
            for p, grad in held:
                p.grad = grad
        return loss

    def _muon_update(self, p: torch.Tensor, group: dict) -> None:
        grad, momentum = p.grad, group["momentum"]
        state = self.state[p]
        if momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = grad.detach().clone()
            else:
                buf.mul_(momentum).add_(grad)
            update = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
        else:
            update = grad
        # banks: [K, Cout, rest] for a Block's [K, Cout, Cin, kh, kw] filters, [1, Cout, rest] for [Cout, ...]
        shape = (-1, p.shape[-4], math.prod(p.shape[-3:])) if p.dim() >= 5 else (1, p.shape[0], -1)
        banks = p.reshape(shape)
        norms = torch.linalg.matrix_norm(banks.float(), keepdim=True).clamp_min(1e-12)
        banks = banks * (math.sqrt(shape[1]) / norms).to(p.dtype)
        banks = banks - group["lr"] * orthogonalize(update.reshape(shape), group["ns_steps"]).to(p.dtype)
        p.copy_(banks.view_as(p))
