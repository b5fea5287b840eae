"""Whole-training throughput: images/s of one training step of the trainer's default preset for the device
(``cpu`` or ``fast``), per backend.

Synthetic uint8 images on the device go through the trainer's own augmentation, optimizer and autocast
settings, so the figure is what `python -m fastblock.train` would see per step (data loading excluded: it is
device-resident by design). CPU uses a smaller batch.
"""
import pytest
import torch
import torch.nn.functional as F

from fastblock import available_backends, backend_names, train
from fastblock.models import build_model


@pytest.mark.parametrize("backend", backend_names())
def test_train_step_throughput(benchmark, backend, device, bench_mode):
    status = available_backends(device)[backend]
    if not status.available or (backend == "triton" and device == "cpu"):
        pytest.skip(f"{backend}: {status.reason if not status.available else 'GPU only'}")
    preset, _ = train.default_preset(torch.device(device))
    cfg = train.resolve_preset(preset)
    model_name = "tiny" if bench_mode == "smoke" else cfg["model"]
    batch = {"smoke": 8, "quick": 16 if device == "cpu" else 512, "full": 32 if device == "cpu" else 512}[bench_mode]
    dev = torch.device(device)
    torch.manual_seed(0)
    model = build_model(model_name, backend=backend).to(dev)
    if hasattr(model, "fit_to_data"):
        model.fit_to_data(torch.randn(256, 3, 32, 32, device=dev))
    channels_last = train.channels_last_for(cfg, dev, model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = train.make_optimizer(cfg, model)
    amp = train.amp_dtype_for(cfg, dev)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=dev)
    labels = torch.randint(0, 10, (batch,), device=dev)
    gen = torch.Generator(device=dev).manual_seed(0)

    def step():
        x = train.augment(cfg, images.float().div_(255), gen)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = F.cross_entropy(model(x).float(), labels, label_smoothing=cfg["label_smoothing"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"train-step {preset} ({model_name}) batch {batch}"
    rounds = {"smoke": 1, "quick": 5, "full": 20}[bench_mode]
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1 if bench_mode == "smoke" else 2, iterations=1)
    benchmark.extra_info.update({"provider": backend, "mode": "train-step", "images_per_step": batch,
                                 "images_per_s": batch / benchmark.stats.stats.median})
