"""GPU tests (skipped without CUDA): every compiled backend vs the float64 reference at the CIFAR stage shapes,
in fp32 / bf16 / fp16, with uninitialised memory filled with NaN (conftest).

float32 is judged elementwise against the float64 answer (not against the float32 reference, whose cuDNN
convolutions use TF32 by default); 16-bit by the median error ratio to the reference in the same dtype over a few
problems (helpers.compare_low_precision says why elementwise tolerances cannot judge 16-bit results)."""
import pytest
import torch

import fastblock
from helpers import Case, compare_low_precision, compare_with_reference

pytestmark = pytest.mark.gpu
FUSED = [name for name in fastblock.backend_names() if fastblock.get_backend(name).fused]

# CIFAR stage shapes (C, HxW) at a reduced batch (the grid logic does not depend on N beyond the tile count),
# plus one full-batch case per schedule.
GPU_SHAPES = [
    Case(32, 64, 64, 32, 32, k=4),
    Case(32, 128, 128, 16, 16, k=4),
    Case(32, 256, 256, 8, 8, k=6),
    Case(32, 512, 512, 4, 4, k=4),
    Case(32, 64, 128, 32, 32, k=1, stride=2),
    Case(32, 128, 128, 16, 16, k=6, ksize=5, channels_last=True),
    Case(256, 128, 128, 16, 16, k=4),
    Case(256, 512, 512, 4, 4, k=6),
]


def _require(backend):
    status = fastblock.available_backends("cuda")[backend]
    if not status.available:
        pytest.skip(f"{backend}: {status.reason}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("case", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gpu_matches_reference_fp32(backend, case, training):
    _require(backend)
    compare_with_reference(backend, case, torch.float32, device="cuda", training=training, seed=11,
                           reference_dtype=torch.float64)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gpu_matches_reference_16bit(backend, dtype, case, training):
    _require(backend)
    compare_low_precision(backend, case, dtype, training=training, seeds=range(3), device="cuda")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("case", [GPU_SHAPES[0], GPU_SHAPES[5]], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation, pool", [("gelu", False), ("relu", True), ("gelu", True)],
                         ids=["gelu", "pool", "pool-gelu"])
def test_gpu_block_variants_match_reference_fp32(backend, case, training, activation, pool):
    """GELU and pool=True on the GPU (pooling: ATen's in the CUDA extension, the pooling kernels in Triton)."""
    _require(backend)
    compare_with_reference(backend, case, torch.float32, device="cuda", training=training, seed=13,
                           reference_dtype=torch.float64, activation=activation, pool=pool)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("case", [Case(3, 4, 5, 7, 6, k=3), Case(2, 3, 3, 5, 5, k=1, stride=2, channels_last=True)],
                         ids=str)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_gpu_gradcheck_fp64(backend, case, activation):
    _require(backend)
    from helpers import gradcheck_backend

    gradcheck_backend(backend, case, training=True, device="cuda", activation=activation)
    if activation == "relu":
        gradcheck_backend(backend, case, training=True, device="cuda", pool=True)


@pytest.mark.parametrize("variant", [{}, {"activation": "gelu", "pool": True}], ids=["relu", "gelu-pool"])
@pytest.mark.parametrize("backend", FUSED)
def test_gpu_block_autocast_compile(backend, variant):
    """As the fast preset trains: bf16 autocast, channels-last, torch.compile (its pool-first GELU Blocks too)."""
    _require(backend)
    block = fastblock.Block(64, 64, num_convs=4, backend=backend, **variant).cuda()
    block = block.to(memory_format=torch.channels_last)
    x = torch.randn(64, 64, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(block, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = compiled(x)
    side = 8 if variant.get("pool") else 16
    assert y.dtype == torch.bfloat16 and y.shape == (64, 64, side, side)
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.float().square().mean().backward()
    assert torch.isfinite(block.weight.grad).all()
