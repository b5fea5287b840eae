"""Networks of fastblock Blocks for CIFAR-10 (importable: ``from fastblock.models import build_model``).

``BlockNet`` is a plain stack described by ``LayerSpec``s (Block, optional residual, pooling, dropout) with a
global-pool + MLP head; ``ResNet32`` is the classic 3x5 basic-block ResNet with K=1 Blocks. ``build_model(name)``
returns the network of a trainer preset.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from .modules import Block, MaxPool2x2


@dataclass
class LayerSpec:
    out_channels: int
    num_convs: int = 4
    kernel_size: Union[int, Sequence[int]] = 3
    gate: str = "softmax"
    gate_hidden: Sequence[int] = ()
    stride: int = 1
    residual: bool = False       # y = Block(x) + shortcut(x) (1x1 conv + BN when the shape changes)
    pool: Optional[str] = None   # "max" | "avg": 2x2 pooling after the layer
    dropout: float = 0.0         # after pooling


class Residual(nn.Module):
    def __init__(self, block: Block, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.block = block
        self.shortcut = nn.Identity() if (in_channels == out_channels and stride == 1) else nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x):
        return self.block(x) + self.shortcut(x)


class BlockNet(nn.Module):
    def __init__(self, layers: Sequence[LayerSpec], in_channels: int = 3, num_classes: int = 10,
                 head_hidden: Sequence[int] = (), head_dropout: float = 0.0, global_pool: str = "avg",
                 logit_scale: float = 1.0, backend: str = "auto"):
        super().__init__()
        body, width = [], in_channels
        for spec in layers:
            block = Block(width, spec.out_channels, num_convs=spec.num_convs, kernel_size=spec.kernel_size,
                          stride=spec.stride, gate=spec.gate, gate_hidden=spec.gate_hidden, backend=backend)
            body.append(Residual(block, width, spec.out_channels, spec.stride) if spec.residual else block)
            if spec.pool == "max":
                body.append(MaxPool2x2(backend))
            elif spec.pool == "avg":
                body.append(nn.AvgPool2d(2))
            if spec.dropout:
                body.append(nn.Dropout(spec.dropout))
            width = spec.out_channels
        self.body = nn.Sequential(*body)
        self.pool = nn.AdaptiveMaxPool2d(1) if global_pool == "max" else nn.AdaptiveAvgPool2d(1)
        head, w = [nn.Flatten()], width
        for hidden in head_hidden:
            head += [nn.Linear(w, hidden), nn.ReLU(inplace=True)] + ([nn.Dropout(head_dropout)] if head_dropout else [])
            w = hidden
        head.append(nn.Linear(w, num_classes))
        self.head = nn.Sequential(*head)
        self.logit_scale = logit_scale

    def forward(self, x):
        return self.head(self.pool(self.body(x))) * self.logit_scale


class BasicBlock(nn.Module):
    """ResNet basic block from two K=1 Blocks. Each Block ends in ReLU (the fused op is conv+BN+ReLU), so the
    second ReLU comes before the residual addition rather than after it -- the nearest fusable form."""

    def __init__(self, cin: int, cout: int, stride: int, backend: str):
        super().__init__()
        self.a = Block(cin, cout, num_convs=1, stride=stride, gate="none", bias=False, backend=backend)
        self.b = Block(cout, cout, num_convs=1, gate="none", bias=False, backend=backend)
        self.shortcut = nn.Identity() if (cin == cout and stride == 1) else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return self.b(self.a(x)) + self.shortcut(x)


class ResNet32(nn.Module):
    def __init__(self, num_classes: int = 10, backend: str = "auto"):
        super().__init__()
        layers, width = [Block(3, 16, num_convs=1, gate="none", bias=False, backend=backend)], 16
        for stage, cout in enumerate((16, 32, 64)):
            for i in range(5):
                layers.append(BasicBlock(width, cout, 2 if (stage > 0 and i == 0) else 1, backend))
                width = cout
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))

    def forward(self, x):
        return self.head(self.body(x))


class PatchWhitening(nn.Module):
    """A fixed first layer: 2x2 patches (stride 1, no padding) projected on the eigenvectors of the training
    images' patch covariance, scaled to unit variance, with both signs (3 -> 24 channels), plus a learnable bias.
    It decorrelates the input for the first Block; ``fit(images)`` sets it from data (before training)."""

    def __init__(self, in_channels: int = 3, patch: int = 2, eps: float = 5e-4):
        super().__init__()
        dim = in_channels * patch * patch
        self.patch, self.eps = patch, eps
        self.register_buffer("weight", torch.zeros(2 * dim, in_channels, patch, patch))
        self.bias = nn.Parameter(torch.zeros(2 * dim))

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @torch.no_grad()
    def fit(self, images: torch.Tensor) -> None:
        """images: [N, C, H, W] float, normalised as the network sees them."""
        p = self.patch
        patches = images.unfold(2, p, 1).unfold(3, p, 1).transpose(1, 3).reshape(-1, self.weight.shape[1] * p * p)
        patches = patches.double()
        cov = torch.cov(patches.T)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        kernels = (eigenvectors.T / torch.sqrt(eigenvalues + self.eps)[:, None]).view(-1, *self.weight.shape[1:])
        self.weight.copy_(torch.cat([kernels, -kernels]).to(self.weight.dtype))

    def forward(self, x):
        return nn.functional.conv2d(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


class AirBlockNet(nn.Module):
    """A speed-run CIFAR-10 network built from gated Blocks: patch whitening, then three stages of
    Block -> 2x2 max-pool -> Block (widths ``widths``, K = ``num_convs`` per Block, ending in ``activation``), global
    max-pool and a bias-free linear head with scaled logits. The layer plan of the public plain-convolution
    speed-runs (airbench), with every conv+BN+activation a fused, gated Block.

    ``downsample``: "pool" (Block, then 2x2 max-pool), "pool-first" (the max-pool inside the stage's first Block,
    between its convolutions and BatchNorm -- the speed-runs' conv -> pool -> BN -> activation order, BatchNorm and
    the activation on a quarter of the pixels) or "stride" (a stride-2 first Block)."""

    def __init__(self, widths: Sequence[int] = (64, 256, 256), num_convs: Union[int, Sequence[int]] = 2,
                 num_classes: int = 10, logit_scale: float = 1 / 9, downsample: str = "pool",
                 whiten_gelu: bool = False, conv_bias: bool = True, activation: str = "relu",
                 backend: str = "auto"):
        super().__init__()
        ks = [num_convs] * 6 if isinstance(num_convs, int) else list(num_convs)
        self.whiten = PatchWhitening()
        # A GELU after the whitening makes its +-pairs of channels two different features (without it the second
        # half is the first one negated, which the next linear convolution gains nothing from).
        self.whiten_act = nn.GELU() if whiten_gelu else nn.Identity()
        layers, width = [], self.whiten.out_channels

        def block(cin, cout, k, stride=1, pool=False):  # K=1: a softmax over one branch is 1 -- no gate layer
            return Block(cin, cout, num_convs=k, stride=stride, gate="softmax" if k > 1 else "none", bias=conv_bias,
                         activation=activation, pool=pool, backend=backend)

        if downsample not in ("pool", "pool-first", "stride"):
            raise ValueError(f"downsample must be 'pool', 'pool-first' or 'stride', got {downsample!r}")
        for stage, out in enumerate(widths):
            if downsample == "pool":  # Block, then 2x2 max-pool
                layers += [block(width, out, ks[2 * stage]), MaxPool2x2(backend)]
            elif downsample == "pool-first":  # conv -> 2x2 max-pool -> BN -> activation, one fused op
                layers += [block(width, out, ks[2 * stage], pool=True)]
            else:  # a stride-2 Block: a quarter of the FLOPs and BatchNorm work
                layers += [block(width, out, ks[2 * stage], stride=2)]
            layers += [block(out, out, ks[2 * stage + 1])]
            width = out
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes, bias=False)
        self.logit_scale = logit_scale

    def fit_to_data(self, images: torch.Tensor) -> None:
        self.whiten.fit(images)

    @torch.no_grad()
    def dirac_init_(self) -> None:
        """Each Block's first branch starts as the identity on its first min(Cin, Cout) output channels (the other
        outputs and branches keep their random initialisation, so the branches differ and the gates can learn)."""
        for block in self.body:
            if isinstance(block, Block):
                nn.init.dirac_(block.weight[0, :min(block.in_channels, block.out_channels)])

    def forward(self, x):
        x = self.body(self.whiten_act(self.whiten(x)))
        return self.head(torch.amax(x, dim=(2, 3))) * self.logit_scale


@dataclass
class ModelRecipe:
    description: str
    make: callable = field(repr=False)


def _fast(backend):
    # ResNet-9-like widths with gated Blocks; max-pool after each widening, max global pool, scaled logits.
    return BlockNet([
        LayerSpec(64, num_convs=1, gate="none"),
        LayerSpec(128, num_convs=4, pool="max"), LayerSpec(128, num_convs=4, residual=True),
        LayerSpec(256, num_convs=4, pool="max"),
        LayerSpec(512, num_convs=4, pool="max"), LayerSpec(512, num_convs=4, residual=True),
    ], global_pool="max", logit_scale=0.125, backend=backend)


def _coursework_a(backend):
    return BlockNet([
        LayerSpec(64, num_convs=4), LayerSpec(64, num_convs=4, residual=True, pool="max"),
        LayerSpec(128, num_convs=4, residual=True), LayerSpec(128, num_convs=4, residual=True, pool="max"),
        LayerSpec(256, num_convs=4, residual=True), LayerSpec(256, num_convs=4, residual=True, pool="max"),
    ], backend=backend)


def _coursework_b(backend):
    chans = (64, 64, 128, 128, 256, 256, 512)
    return BlockNet([LayerSpec(c, num_convs=4, pool="max" if i % 2 == 1 else None) for i, c in enumerate(chans)],
                    backend=backend)


def _coursework_c(backend):
    mixed, gate = [5, 5, 5, 3, 3, 3], (512, 512)
    spec = lambda c, **kw: LayerSpec(c, num_convs=6, kernel_size=mixed, gate_hidden=gate, **kw)  # noqa: E731
    return BlockNet([
        spec(32), spec(32, pool="avg", dropout=0.1),
        spec(64), spec(64, residual=True, pool="max", dropout=0.1),
        spec(128), spec(128, residual=True), spec(128, residual=True, pool="max", dropout=0.1),
    ], head_hidden=(1024, 512), head_dropout=0.1, backend=backend)


def _coursework_d(backend):
    return BlockNet([LayerSpec(c, num_convs=6, pool="max", dropout=0.1) for c in (64, 128, 256, 512)],
                    head_hidden=(256, 128, 64), backend=backend)


def _tiny(backend):
    return BlockNet([LayerSpec(16, num_convs=2, pool="max"), LayerSpec(32, num_convs=2, pool="max", residual=True)],
                    backend=backend)


def _air(widths, num_convs, downsample="pool", **options):
    return lambda backend: AirBlockNet(widths, num_convs, downsample=downsample, backend=backend, **options)


MODELS = {
    "air-cpu": ModelRecipe("patch whitening + 3 stages of (K=2 Block, max-pool, K=2 Block), 48-192-192, global "
                           "max-pool, linear head: a speed-run layout of gated Blocks", _air((48, 192, 192), 2)),
    "air-cpu-k1": ModelRecipe("air-cpu with K=1 Blocks (plain conv + BN + ReLU): the K ablation's baseline",
                              _air((48, 192, 192), 1)),
    "air-cpu-k4": ModelRecipe("air-cpu with K=4 Blocks", _air((48, 192, 192), 4)),
    "air-cpu-wide-k1": ModelRecipe("patch whitening + 3 stages of (Block, max-pool, Block), 64-256-256, K=1 Blocks "
                                   "(fused conv + BN + ReLU), global max-pool, linear head",
                                   _air((64, 256, 256), 1)),
    "air-cpu-wide-k1-gelu": ModelRecipe("air-cpu-wide-k1 with a GELU after the patch whitening (as the public "
                                        "speed-run has it) and bias-free convolutions (BatchNorm cancels a bias)",
                                        _air((64, 256, 256), 1, whiten_gelu=True, conv_bias=False)),
    "air-cpu-wide-k1-gelu-blocks": ModelRecipe("air-cpu-wide-k1-gelu with GELU Blocks (fused conv + BN + GELU) in "
                                               "place of ReLU, as the public speed-run's activation",
                                               _air((64, 256, 256), 1, whiten_gelu=True, conv_bias=False,
                                                    activation="gelu")),
    "air-cpu-wide-k1-poolfirst": ModelRecipe("air-cpu-wide-k1-gelu with each stage's max-pool inside its first "
                                             "Block, between the convolution and BatchNorm (fused conv -> pool -> "
                                             "BN -> ReLU, the public speed-run's order)",
                                             _air((64, 256, 256), 1, "pool-first", whiten_gelu=True,
                                                  conv_bias=False)),
    "air-cpu-wide-k1-poolfirst-gelu": ModelRecipe("patch whitening + GELU, then 3 stages of (Block with the "
                                                  "stage's 2x2 max-pool inside: conv -> max-pool -> BN -> GELU, "
                                                  "Block: conv -> BN -> GELU), 64-256-256, bias-free K=1 GELU "
                                                  "Blocks, global max-pool, linear head: the public speed-run's "
                                                  "network, fused",
                                                  _air((64, 256, 256), 1, "pool-first", whiten_gelu=True,
                                                       conv_bias=False, activation="gelu")),
    "air-cpu-small": ModelRecipe("air-cpu narrowed to 32-128-128 (K=2)", _air((32, 128, 128), 2)),
    "air-cpu-small-k1": ModelRecipe("air-cpu-small with K=1 Blocks (plain conv + BN + ReLU): the ablation baseline",
                                    _air((32, 128, 128), 1)),
    "air-cpu-small-k4": ModelRecipe("air-cpu-small with K=4 Blocks", _air((32, 128, 128), 4)),
    "air-gpu": ModelRecipe("the air-cpu layout widened for GPUs: 64-256-256, K=4", _air((64, 256, 256), 4)),
    "air-gpu-gelu": ModelRecipe("air-gpu with a GELU after the patch whitening (as air-cpu-wide-k1-gelu)",
                                _air((64, 256, 256), 4, whiten_gelu=True)),
    "tiny": ModelRecipe("2 small K=2 Blocks (16, 32 channels): smoke tests and CPU demos", _tiny),
    "resnet9-gated": ModelRecipe("compact gated-Block ResNet-9-like net (64-128-256-512, K=4, max-pools, "
                                 "residuals)", _fast),
    "coursework-a": ModelRecipe("6 K=4 Blocks with residual connections, max-pools, avg-pool + linear head",
                                _coursework_a),
    "coursework-b": ModelRecipe("7 K=4 Blocks, max-pool every other block, avg-pool + linear head. The "
                                "original's PReLU cannot be fused, so the Blocks use ReLU (nearest fusable form)",
                                _coursework_b),
    "coursework-c": ModelRecipe("7 Blocks, K=6 mixed 5x5/3x3 branches, 32->64->128, avg-pool after 2, max-pool "
                                "after 4 and 7, residuals on 4/6/7, dropout after pooling, MLP gate (512,512,K), "
                                "MLP head (1024,512,10)", _coursework_c),
    "coursework-d": ModelRecipe("4 Blocks, K=6, 64/128/256/512, max-pool + dropout 0.1 after each, MLP head "
                                "(256,128,64,10)", _coursework_d),
    "resnet32": ModelRecipe("ResNet-32 (3 stages x 5 basic blocks, 16/32/64) from K=1 Blocks; ReLU before the "
                            "residual add (nearest fusable form)", lambda backend: ResNet32(backend=backend)),
}


def build_model(name: str, backend: str = "auto") -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name].make(backend)


def count_flops(model: nn.Module, image_shape=(3, 32, 32)) -> int:
    """Multiply-adds x2 per image, counting each Block as ONE aggregated convolution (what fastblock runs)."""
    total = 0

    def conv_hook(mod, inp, out):
        nonlocal total
        if isinstance(mod, Block):
            k = mod.weight.shape[-1]
            h, w = inp[0].shape[-2:]  # the convolution's output size ("same" padding), before a Block's own pooling
            pixels = ((h - 1) // mod.stride + 1) * ((w - 1) // mod.stride + 1)
            total += 2 * mod.out_channels * pixels * mod.in_channels * k * k
        elif isinstance(mod, nn.Conv2d):
            total += 2 * out[0].numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, nn.Linear):
            total += 2 * mod.in_features * mod.out_features

    hooks = [m.register_forward_hook(conv_hook) for m in model.modules()
             if isinstance(m, (Block, nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            p = next(model.parameters())
            model(torch.zeros(1, *image_shape, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return total
