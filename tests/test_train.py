"""The CIFAR-10 trainer on tiny generated datasets (both formats), on CPU."""
import json
import os
import pickle
import re
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

import fastblock
from fastblock import data as fdata
from fastblock import train
from fastblock.models import MODELS, build_model

ROOT = Path(__file__).resolve().parent.parent
CLASSES = [f"class{c}" for c in range(10)]


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    x = (torch.rand(n, 3, 32, 32, generator=g) * 80).to(torch.uint8)
    for i, c in enumerate(labels.tolist()):
        x[i, c % 3] += 100 + 10 * c  # a class-dependent colour, so a few steps can learn it
    return x, labels


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory):
    from torchvision.io import write_png

    root = tmp_path_factory.mktemp("folder")
    for split, n, seed in (("train", 200, 0), ("test", 50, 1)):
        x, y = _images(n, seed)
        for i in range(n):
            d = root / split / CLASSES[int(y[i])]
            d.mkdir(parents=True, exist_ok=True)
            write_png(x[i], str(d / f"{i}.png"))
    return root


@pytest.fixture(scope="module")
def batches_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("batches") / "cifar-10-batches-py"
    root.mkdir()
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        x, y = _images(20, i)
        with open(root / name, "wb") as fh:
            pickle.dump({"data": x.reshape(20, -1).numpy(), "labels": y.tolist()}, fh)
    with open(root / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": CLASSES}, fh)
    return root.parent


def _train(tmp_path, data_dir, *extra, name="run"):
    out = tmp_path / name
    argv = ["--data-dir", str(data_dir), "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--no-download",
            "--preset", "tiny", "--out", str(out), "--backend", "reference", *extra]
    assert train.main(argv) == 0
    return out


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--backend", "--preset", "--data-dir", "--epochs", "--batch-size", "--lr", "--optimizer", "--amp",
                 "--compile", "--out", "--resume", "--seed", "--tta", "--eval-only", "--val-split", "--accum-steps"):
        assert flag in text


@pytest.mark.parametrize("flag, word, choices", [("--flip", "sideways", "on, off, alternate"),
                                                  ("--tta", "all", "on, off, flip-translate, flip-translate-all")])
def test_a_misspelt_choice_is_a_one_line_error(flag, word, choices, capsys):
    with pytest.raises(SystemExit) as exc:
        train.main([flag, word])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: invalid choice {word!r} (choose from {choices})" in err and "Traceback" not in err


@pytest.mark.parametrize("flag, value, message", [
    ("--time-budget", "0", "must be > 0"), ("--time-budget", "-1", "must be > 0"), ("--epochs", "inf", "must be > 0"),
    ("--val-split", "1.0", "must be in [0, 1)"), ("--lr", "-1", "must be >= 0"),
    ("--momentum", "1", "must be in [0, 1)"), ("--ema", "1.5", "must be in [0, 1)"),
    ("--label-smoothing", "2", "must be in [0, 1]"), ("--bn-momentum", "nan", "must be in [0, 1]"),
    ("--subset", "-3", "must be >= 0"), ("--batch-size", "0", "must be >= 1"),
    ("--crop-pad", "1.5", "invalid int value: '1.5'"), ("--cutout", "-2", "must be >= 0"),
    ("--ema-every", "0", "must be >= 1"), ("--warmup-fraction", "2", "must be in [0, 1]")])
def test_a_number_out_of_range_is_a_one_line_error(flag, value, message, tmp_path, capsys):
    """Every numeric flag is checked where argparse reads it: a value outside its range (which trained silently
    with a meaningless setting -- a negative time budget, weight decay, cutout --, or died in a traceback from torch
    -- a negative learning rate or momentum, a held-out share of 1) is argparse's one-line error, before anything
    runs or is created."""
    with pytest.raises(SystemExit) as exc:
        train.main(["--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "run"), f"{flag}={value}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: {message}" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("device, message", [("nonsense", "not a device: 'nonsense'"),
                                             ("mps", "fastblock runs on cpu and cuda devices")]
                         + ([] if torch.cuda.is_available() else [("cuda:0", "no CUDA device is available here")]))
def test_a_device_this_machine_lacks_is_a_one_line_error(device, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(["--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "run"), "--device", device])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --device: " in err and message in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_list_presets(capsys):
    assert train.main(["--list-presets"]) == 0
    text = capsys.readouterr().out
    for name in ("fast", "coursework-a", "coursework-b", "coursework-c", "coursework-d", "resnet32"):
        assert name in text


def test_folder_training_lowers_loss_and_writes_run(tmp_path, folder_data):
    out = _train(tmp_path, folder_data, "--epochs", "4", "--batch-size", "32", "--lr", "0.05")
    rows = list((out / "metrics.csv").read_text().splitlines())
    assert rows[0].split(",") == train.METRIC_FIELDS and len(rows) == 5
    losses = [float(r.split(",")[2]) for r in rows[1:]]
    assert losses[-1] < losses[0] * 0.9, losses
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_test_acc"] > 0.2 and summary["epochs"] == 4
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["lr"] == 0.05 and config["torch"] == torch.__version__
    assert (out / "curves.png").stat().st_size > 1000
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert set(ckpt) >= {"model", "config", "test_acc"}
    # the decoded folder was cached and is reused (a second load does not decode again)
    cached = list((tmp_path / "cache").glob("cifar-folder-*.pt"))
    assert len(cached) == 1
    assert "cached" in fdata.load_cifar10(folder_data, tmp_path / "cache", progress=False).source


def test_batches_format_and_val_split(tmp_path, batches_data):
    data = fdata.load_cifar10(batches_data, download=False, progress=False)
    assert data.train_x.shape == (100, 3, 32, 32) and data.classes == CLASSES
    split = fdata.split_validation(data, 0.2, seed=0)
    assert len(split.test_y) == 20 and len(split.train_y) == 80
    held = {tuple(v.flatten()[:16].tolist()) for v in split.test_x}
    assert not any(tuple(v.flatten()[:16].tolist()) in held for v in split.train_x)  # no leak
    _train(tmp_path, batches_data, "--epochs", "1", "--batch-size", "20", "--val-split", "0.2")


@pytest.mark.parametrize("optimizer", ["sgd", "muon"])
def test_resume_is_identical_to_uninterrupted(tmp_path, folder_data, optimizer):
    common = ["--epochs", "3", "--batch-size", "32", "--seed", "5", "--cutout", "8", "--ema", "0.9",
              "--optimizer", optimizer]
    full = _train(tmp_path, folder_data, *common, name="full")
    part = _train(tmp_path, folder_data, *common, "--stop-after", "2", name="part")  # as if killed after epoch 2
    assert len((part / "metrics.csv").read_text().splitlines()) == 3
    assert train.main(["--resume", str(part), "--no-progress", "--cache-dir", str(tmp_path / "cache")]) == 0
    a = torch.load(full / "last.pt", weights_only=True)
    b = torch.load(part / "last.pt", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["ema"]:
        assert torch.equal(a["ema"][key], b["ema"][key]), key
    strip_time = lambda text: [",".join(r.split(",")[:6]) for r in text.splitlines()]  # noqa: E731
    assert strip_time((full / "metrics.csv").read_text()) == strip_time((part / "metrics.csv").read_text())


def test_resume_keeps_the_precision_and_layout_the_run_began_with(tmp_path, folder_data, monkeypatch, capsys):
    """--amp and --channels-last "auto" are chosen when a run begins; --resume keeps those choices, so a run
    resumed where "auto" would now choose otherwise (here: a CPU that has bf16 matrix instructions, where "auto"
    means bf16 and channels-last) ends exactly where the uninterrupted run does."""
    from fastblock.train import loop

    common = ["--epochs", "2", "--batch-size", "32", "--seed", "2"]
    full = _train(tmp_path, folder_data, *common, name="full")
    part = _train(tmp_path, folder_data, *common, "--stop-after", "1", name="part")
    began = torch.load(part / "last.pt", weights_only=True)["choices"]
    assert began == {"device_type": "cpu", "amp": "off", "channels_last": False}
    monkeypatch.setattr(loop, "cpu_bf16_native", lambda: "AMX")
    assert loop.amp_dtype_for(train.resolve_preset("tiny"), torch.device("cpu")) == torch.bfloat16
    capsys.readouterr()
    assert train.main(["--resume", str(part), "--no-progress", "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "precision and layout as the run began: float32, NCHW" in out and ", NCHW" in out.split("model:")[1]
    a = torch.load(full / "last.pt", weights_only=True)
    b = torch.load(part / "last.pt", weights_only=True)
    assert b["choices"] == began and b["config"]["amp"] == "auto"  # the config keeps the user's setting
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    fdata.atomic_torch_save({"v": torch.ones(3)}, target)

    def crash(obj, fh):
        fh.write(b"partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        fdata.atomic_torch_save({"v": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert torch.equal(torch.load(target, weights_only=True)["v"], torch.ones(3))  # the old file is intact


def test_eval_only_prints_per_class_table(tmp_path, folder_data, capsys):
    out = _train(tmp_path, folder_data, "--epochs", "1", "--batch-size", "50")
    capsys.readouterr()
    assert train.main(["--eval-only", str(out / "best.pt"), "--data-dir", str(folder_data), "--cache-dir",
                       str(tmp_path / "cache"), "--tta", "--backend", "reference", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "accuracy" in text and "confusion matrix" in text and "class9" in text


def test_eval_only_runs_as_the_trainer_evaluates(tmp_path, folder_data, capsys):
    """--eval-only picks its backend as training does and, on CPU with the extension, evaluates inside the
    extension's allocation pool as the run's own evaluations do (without it every batch page-faults its buffers
    in afresh)."""
    from fastblock import extension

    if not fastblock.available_backends("cpu")["extension"].available:
        pytest.skip("needs the extension")
    out = _train(tmp_path, folder_data, "--epochs", "1", "--batch-size", "50")
    capsys.readouterr()
    limit = extension.cpu_pool_stats()["limit_bytes"]
    try:
        hits = extension.cpu_pool_stats()["hits"]
        assert train.main(["--eval-only", str(out), "--data-dir", str(folder_data), "--cache-dir",
                           str(tmp_path / "cache"), "--backend", "extension", "--tta", "--no-progress"]) == 0
        assert extension.cpu_pool_stats()["hits"] > hits  # the second view's buffers are the first one's
    finally:
        extension.set_cpu_pool_limit(limit)
    text = capsys.readouterr().out
    assert "backend: extension" in text and "allocation pool" in text and "accuracy" in text


@pytest.mark.parametrize("problem, message", [
    ("missing", "no CIFAR-10 found"),
    ("mismatch", "class folders differ"),
    ("size", "expected 32x32"),
    ("corrupt", "cannot decode image"),
    ("empty_class", "contains no .png/.jpg images"),
])
def test_bad_data_errors(tmp_path, problem, message, capsys):
    from torchvision.io import write_png

    root = tmp_path / "data"
    img = torch.zeros(3, 32, 32, dtype=torch.uint8)
    if problem != "missing":
        for split in ("train", "test"):
            for c in ("a", "b"):
                (root / split / c).mkdir(parents=True)
                write_png(img, str(root / split / c / "0.png"))
    if problem == "mismatch":
        (root / "test" / "b" / "0.png").unlink()
        (root / "test" / "b").rmdir()
    elif problem == "size":
        write_png(torch.zeros(3, 28, 30, dtype=torch.uint8), str(root / "train" / "a" / "small.png"))
    elif problem == "corrupt":
        (root / "train" / "b" / "broken.png").write_bytes(b"not a png at all")
    elif problem == "empty_class":
        (root / "train" / "c").mkdir()
    rc = train.main(["--data-dir", str(root), "--cache-dir", str(tmp_path / "cache"), "--no-download",
                     "--no-progress", "--preset", "tiny", "--out", str(tmp_path / "run")])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    if problem in ("size", "corrupt"):
        assert ("small.png" in err) or ("broken.png" in err)


def test_offline_download_message(tmp_path, monkeypatch, capsys):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    rc = train.main(["--data-dir", str(tmp_path / "nothing"), "--no-progress", "--preset", "tiny",
                     "--out", str(tmp_path / "run")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "could not be downloaded" in err and "--data-dir" in err and "Traceback" not in err


def test_archive_input(tmp_path, folder_data):
    import tarfile

    archive = tmp_path / "cifar10-jpeg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder_data, arcname="cifar10-jpeg")
    data = fdata.load_cifar10(archive, tmp_path / "cache", progress=False)
    assert len(data.train_y) == 200 and data.classes == CLASSES


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_preset_model_builds_and_steps(name):
    torch.manual_seed(0)
    model = build_model(name, backend="reference")
    opt = train.make_optimizer(dict(train.resolve_preset(name if name in train.PRESETS else "fast"),
                                    **({"model": name})), model)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


def test_pool_first_network_has_the_same_layers_and_flops():
    """downsample="pool-first" moves each stage's max-pool into its first Block (pool=True): same parameters, same
    convolution FLOPs (counted before the Block's own pooling), same output; BatchNorm sees the pooled map."""
    from fastblock import Block, MaxPool2x2
    from fastblock.models import AirBlockNet, count_flops

    after = AirBlockNet((8, 16, 16), 1, backend="reference")
    first = AirBlockNet((8, 16, 16), 1, downsample="pool-first", backend="reference")
    assert sum(p.numel() for p in first.parameters()) == sum(p.numel() for p in after.parameters())
    assert count_flops(first) == count_flops(after) > 0
    assert not any(isinstance(m, MaxPool2x2) for m in first.modules())
    assert [m.pool for m in first.body if isinstance(m, Block)] == [True, False] * 3
    assert first(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    with pytest.raises(ValueError, match="downsample must be"):
        AirBlockNet(downsample="avg")


def test_weight_decay_skips_bn_and_bias():
    model = build_model("tiny")
    decay, no_decay = train.param_groups(model, 5e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(not names[id(p)].endswith("bias") and "bn." not in names[id(p)] for p in decay["params"])
    assert any(names[id(p)].endswith("bn.weight") for p in no_decay["params"])
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0


def test_augmentations_keep_shape_and_are_seeded():
    x = torch.rand(6, 3, 32, 32)
    for fn in (lambda t, g: fdata.random_crop(t, 4, g), fdata.random_flip, lambda t, g: fdata.cutout(t, 8, g),
               lambda t, g: fdata.random_affine(t, g, degrees=15)):
        a = fn(x, torch.Generator().manual_seed(1))
        b = fn(x, torch.Generator().manual_seed(1))
        assert a.shape == x.shape and torch.equal(a, b)
    # crop with zero offset range is the identity; a crop is a translation of the original pixels
    assert torch.equal(fdata.random_crop(x, 0, torch.Generator()), x)
    assert torch.equal(fdata.random_crop(x, -1, torch.Generator()), x)  # a pad below 0 translates nothing


def test_small_crops_are_windows_of_the_images():
    """A small crop is an SxS window of each image at a random offset, every offset possible, seeded; one larger
    than the (padded) image is refused."""
    x = torch.arange(4 * 1 * 6 * 6, dtype=torch.float32).view(4, 1, 6, 6)
    windows = {(oy, ox): x[:, :, oy:oy + 4, ox:ox + 4] for oy in range(3) for ox in range(3)}
    seen = set()
    for seed in range(40):
        a = fdata.random_crop(x, 0, torch.Generator().manual_seed(seed), size=4)
        assert torch.equal(a, fdata.random_crop(x, 0, torch.Generator().manual_seed(seed), size=4))
        for i in range(len(x)):
            hits = [o for o, w in windows.items() if torch.equal(a[i], w[i])]
            assert len(hits) == 1, (seed, i)
            seen.add(hits[0])
    assert seen == set(windows)
    with pytest.raises(ValueError, match="does not fit"):
        fdata.random_crop(x, 0, torch.Generator(), size=7)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_network_takes_the_smallest_small_crop(name):
    from fastblock.train.loop import MIN_SMALL_CROP

    model = build_model(name, backend="reference").eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, MIN_SMALL_CROP, MIN_SMALL_CROP)).shape == (2, 10)


def test_small_crop_steps_count_their_share_of_the_pixels():
    from fastblock.train import loop

    cfg, plan = {"small_crop": 16, "small_crop_epochs": 1.5}, loop.Plan(steps_per_epoch=10, total_steps=40)
    assert loop.small_crop_steps(cfg, plan) == 15
    assert loop.step_cost(cfg, plan, 0, 40) == 15 * 0.25 + 25
    assert loop.step_cost(cfg, plan, 12, 18) == 3 * 0.25 + 3
    for start in (0, 5, 14, 15, 30):
        for cost in (0.0, 0.2, 1.0, 3.75, 4.0, 9.9, 30.0):
            n = loop.steps_within(cfg, plan, start, cost)
            # the most steps that fit: n steps do, n + 1 do not
            assert loop.step_cost(cfg, plan, start, start + n) <= cost < loop.step_cost(cfg, plan, start, start + n + 1)
    assert loop.step_cost({"small_crop": 0, "small_crop_epochs": 2.0}, plan, 0, 40) == 40


def test_small_crops_train_the_first_epochs_and_the_budget_plans_for_them(tmp_path, folder_data, monkeypatch,
                                                                          capsys):
    """--small-crop 16 for the first epoch (10 steps): those steps see 16x16 windows, the rest whole images. The
    time budget's probe times small steps; its plan counts each full-size step ahead as 4 of them (the pixels'
    ratio), where the small steps' pace alone would plan ~4x too many."""
    from fastblock.train import loop

    sizes, real_augment = [], loop.augment

    def recording_augment(*args, **kwargs):
        out = real_augment(*args, **kwargs)
        sizes.append(out.shape[-1])
        return out

    monkeypatch.setattr(loop, "augment", recording_augment)
    calls = _timed_steps(monkeypatch, lambda n: 0.05 if n <= 10 else 0.2)
    budget_s = 4.0  # 10 small steps take 0.5 s: ~17 full-size steps fit after them
    out = _train(tmp_path, folder_data, "--time-budget", str(budget_s / 60), "--batch-size", "20", "--small-crop",
                 "16", "--small-crop-epochs", "1")
    text = capsys.readouterr().out
    assert "small crops: the first 1 epoch (10 steps) train on random 16x16 windows" in text
    assert sizes[:10] == [16] * 10 and set(sizes[10:]) == {32}, sizes
    # the probe's plan, from the times the run recorded
    seconds = _step_seconds(out)
    probe_end = 1 + loop.PROBE_STEPS
    small_step = sorted(b - a for a, b in zip(seconds[:probe_end - 1], seconds[1:probe_end]))[loop.PROBE_STEPS // 2]
    planned = int(re.search(r"time budget \S+ min at \S+ s/step per full-size step: (\d+) steps", text).group(1))
    # steps.csv rounds times to 1 ms
    fit = [10 + (budget_s - seconds[probe_end - 1] - (10 - probe_end) * (small_step + d)) / (4 * (small_step + d))
           for d in (1e-3, -1e-3)]
    assert fit[0] - 1 <= planned <= fit[1] + 1, (planned, fit, seconds)
    _assert_within_budget(out, budget_s, calls["n"])


@pytest.mark.parametrize("flags, message", [(["--small-crop", "12"], "--small-crop must be from 16 to 31"),
                                            (["--small-crop", "32"], "--small-crop must be from 16 to 31"),
                                            (["--small-crop", "24"], "needs --small-crop-epochs > 0")])
def test_small_crop_mistakes_are_one_line_errors(tmp_path, folder_data, flags, message, capsys):
    argv = ["--data-dir", str(folder_data), "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--no-download",
            "--preset", "tiny", "--out", str(tmp_path / "run"), "--backend", "reference", *flags]
    assert train.main(argv) != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_torchrun_two_process_gloo(tmp_path, folder_data):
    """Two ranks, with a parameter (the whitening bias) that stops training after the first epoch."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "fastblock.train", "--data-dir", str(folder_data), "--cache-dir", str(tmp_path / "cache"), "--no-progress",
           "--preset", "tiny", "--model", "air-cpu-small", "--whiten-bias-epochs", "1", "--epochs", "2",
           "--batch-size", "40", "--backend", "reference", "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "2 ranks" in proc.stdout
    assert len((tmp_path / "ddp" / "metrics.csv").read_text().splitlines()) == 3


@pytest.mark.slow
def test_torchrun_time_budget_plans_the_same_steps_on_every_rank(tmp_path, folder_data):
    """--time-budget under two ranks: each times its own steps, and a plan (or a decision to stop mid-epoch) from
    one rank's timings alone would leave the other waiting in a collective for a step that never comes. The ranks
    plan on their mean timings and stop together when any would run past the budget, which training then ends
    within, give or take the last step."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "fastblock.train", "--data-dir", str(folder_data), "--cache-dir", str(tmp_path / "cache"), "--no-progress",
           "--preset", "tiny", "--time-budget", "0.1", "--batch-size", "8", "--backend", "reference",
           "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "time budget 0.1 min" in proc.stdout
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    seconds = _step_seconds(tmp_path / "ddp")
    assert summary["train_seconds"] <= 6 + max(b - a for a, b in zip(seconds, seconds[1:])), (summary, seconds)


def test_unavailable_backend_is_a_clear_error(tmp_path, folder_data, capsys, monkeypatch):
    from fastblock import backends

    monkeypatch.setattr(backends.Backend, "status",
                        lambda self, device_type: backends.BackendStatus(self.name == "reference", "no CUDA device"))
    rc = train.main(["--data-dir", str(folder_data), "--backend", "triton", "--no-progress", "--preset", "tiny",
                     "--out", str(tmp_path / "run")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "backend 'triton' cannot run" in err and "--backend auto" in err and "Traceback" not in err


def test_pil_decoder_matches_torchvision(folder_data, monkeypatch):
    """Pillow is the fallback decoder once torchvision drops image decoding: same pixels on lossless PNGs, and the
    fallback is what gets picked when torchvision.io cannot be imported."""
    files = sorted((folder_data / "train").rglob("*.png"))[:5]
    for f in files:
        assert torch.equal(fdata._decode(f, fdata._decode_pil), fdata._decode(f, fdata._decode_torchvision))
    monkeypatch.setitem(sys.modules, "torchvision.io", None)  # import now raises ImportError
    assert fdata._image_decoder() is fdata._decode_pil
    with pytest.raises(fdata.DataError, match="cannot decode image"):
        fdata._decode(files[0].with_suffix(".missing.png"), fdata._decode_pil)


def test_progress_bars_refresh_rarely_in_logs(monkeypatch):
    """On a terminal the bars refresh live; into a log file or pipe (CI, nohup) only twice a minute, so a log gets
    a handful of bar lines per epoch instead of one per step."""
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert fdata.progress_interval() < 1
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert fdata.progress_interval() >= 10


def test_channels_last_default_follows_the_precision_and_the_blocks(monkeypatch):
    """"auto" means channels-last on CUDA, and on CPUs that train in bf16 (oneDNN's fast bf16 convolutions are the
    channels-last ones); on CPUs that train in float32 only for networks whose Blocks are all K=1 (plain
    convolutions: faster channels-last; K=2 networks ran faster NCHW: bench/RESULTS.md). The speed-run presets
    leave it to "auto", which makes their K=1 network channels-last in every precision."""
    from torch import nn

    from fastblock import Block
    from fastblock.train import loop

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    k1, k2 = build_model("air-cpu-small-k1", "reference"), build_model("air-cpu-small", "reference")
    mixed = nn.Sequential(build_model("air-cpu-small-k1", "reference"), Block(8, 8, num_convs=2))
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))  # no Blocks: nothing measured, as before
    speed_runs = [train.resolve_preset(name) for name in ("cpu", "fast")]
    speed_run_net = build_model(speed_runs[0]["model"], "reference")
    assert all(speed_run["model"] == speed_runs[0]["model"] for speed_run in speed_runs)
    cfg = train.resolve_preset("resnet9")
    assert cfg["channels_last"] == "auto"
    assert train.channels_last_for(cfg, cuda) is True
    assert train.channels_last_for(cfg, cuda, k2) is True
    for native, bf16 in (("AMX", True), (None, False)):
        monkeypatch.setattr(loop, "cpu_bf16_native", lambda n=native: n)
        for speed_run in speed_runs:
            assert speed_run["channels_last"] == "auto"
            assert train.channels_last_for(speed_run, cpu, speed_run_net) is True
        assert train.channels_last_for(cfg, cpu, k1) is True
        for model in (k2, mixed, plain, None):
            assert train.channels_last_for(cfg, cpu, model) is bf16
        off = dict(cfg, amp="off")
        assert train.channels_last_for(off, cpu, k1) is True
        for model in (k2, mixed, plain, None):
            assert train.channels_last_for(off, cpu, model) is False
    assert train.channels_last_for(dict(cfg, channels_last=True), cpu, k2) is True
    assert train.channels_last_for(dict(cfg, channels_last=False), cpu, k1) is False
    assert train.channels_last_for(dict(cfg, channels_last=False), cuda) is False


# --- the trainer as a new user meets it --------------------------------------------------------------------------
def test_averaged_weights_are_not_worse_than_raw(tmp_path, folder_data):
    """The evaluated (EMA) weights of a short run are about as good as the raw weights: the decay warms up, so the
    average does not hold on to the random initialisation (it used to report 10% next to a raw 29% and more)."""
    out = _train(tmp_path, folder_data, "--epochs", "6", "--batch-size", "20", "--lr", "0.05", "--ema", "0.99",
                 "--ema-every", "5", "--no-tta")
    rows = [r.split(",") for r in (out / "metrics.csv").read_text().splitlines()]
    header, last = rows[0], dict(zip(rows[0], rows[-1]))
    assert "raw_test_acc" in header and "test_acc" in header
    assert float(last["raw_test_acc"]) > 0.3, last
    assert float(last["test_acc"]) >= float(last["raw_test_acc"]) - 0.06, last  # 3 of the 50 test images


def test_steps_csv_and_projection(tmp_path, folder_data, capsys):
    out = _train(tmp_path, folder_data, "--epochs", "2", "--batch-size", "20")
    steps = (out / "steps.csv").read_text().splitlines()
    assert steps[0].split(",") == train.STEP_FIELDS and len(steps) == 1 + 2 * 10
    assert float(steps[-1].split(",")[1]) == 2.0  # epoch position of the last step
    text = capsys.readouterr().out
    assert "projected training time" in text and text.index("projected training time") < text.index("epoch   1.00")


def test_time_budget_plans_the_steps(tmp_path, folder_data, monkeypatch, capsys):
    """Steps of 0.1 s in a 1.2 s budget: the probe's 6 steps fit, and the run ends after about 12 steps, not after
    the preset's 3 epochs (30 steps)."""
    from fastblock.train import loop

    _timed_steps(monkeypatch, lambda n: 0.1)
    out = _train(tmp_path, folder_data, "--time-budget", str(1.2 / 60), "--batch-size", "20")
    assert "time budget" in capsys.readouterr().out
    config = torch.load(out / "last.pt", weights_only=True)
    assert 1 + loop.PROBE_STEPS <= config["plan"]["total_steps"] < 20


def test_time_budget_counts_a_slow_first_step(tmp_path, folder_data, monkeypatch, capsys):
    """A first step that takes most of the budget (torch.compile on a GPU, a JIT build) is part of the training
    time: the probe plans only the steps that fit in what is left."""
    from fastblock.train import loop

    calls = _timed_steps(monkeypatch, lambda n: 2.0 if n == 1 else 0.05)
    budget_s = 3.0  # all within the first epoch (100 steps of 2 images), before any end-of-epoch re-plan
    out = _train(tmp_path, folder_data, "--time-budget", str(budget_s / 60), "--batch-size", "2")
    # the plan, from the times the run recorded
    seconds = _step_seconds(out)
    probe_end = 1 + loop.PROBE_STEPS
    per_step = sorted(b - a for a, b in zip(seconds[:probe_end - 1], seconds[1:probe_end]))[loop.PROBE_STEPS // 2]
    planned = int(re.search(r"time budget \S+ min at \S+ s/step: (\d+) steps", capsys.readouterr().out).group(1))
    # steps.csv rounds times to 1 ms: the test's per-step time is known to +-1 ms
    fit = [probe_end + (budget_s - seconds[probe_end - 1]) / (per_step + d) for d in (1e-3, -1e-3)]
    assert fit[0] - 1 <= planned <= fit[1] + 1, (planned, fit, seconds)
    # the steps after it were re-fitted to the time left as they ran (the time runs out in this epoch): the run
    # ends where its plan ends, within the budget, less than a few steps before it
    assert len(seconds) == calls["n"] == torch.load(out / "last.pt", weights_only=True)["plan"]["total_steps"]
    step = statistics.median(b - a for a, b in zip(seconds[probe_end:], seconds[probe_end + 1:]))
    assert budget_s - 3 * step <= seconds[-1] <= budget_s + max(seconds[-1] - seconds[-2], 0.05), (step, seconds)


def test_time_budget_holds_when_the_machine_slows_down(tmp_path, folder_data, monkeypatch, capsys):
    """Steps that get 3x slower after the first epoch (a VM whose speed drifts): the steps left are re-fitted at
    each epoch end, a step that would end past the budget is not started, and training ends within the budget
    (give or take the last step) instead of 3x past it."""
    calls = _timed_steps(monkeypatch, lambda n: 0.02 if n <= 10 else 0.06)  # 10 steps = the first epoch
    budget_s = 2.4
    out = _train(tmp_path, folder_data, "--time-budget", str(budget_s / 60), "--batch-size", "20")
    assert "more steps (planned:" in capsys.readouterr().out
    _assert_within_budget(out, budget_s, calls["n"])


def test_time_budget_refits_the_epoch_where_the_time_runs_out(tmp_path, folder_data, monkeypatch, capsys):
    """Steps that get ~10x slower within an epoch: no epoch end comes to re-plan before the time runs out, so the
    steps left are re-fitted to the time left as they go -- the learning-rate decay finishes at the budget instead
    of being cut off near the rate it had (the run ends where its re-fitted plan ends, within the budget)."""
    calls = _timed_steps(monkeypatch, lambda n: 0.02 if n <= 30 else 0.3)  # slow from epoch 4 (steps 31-40) on
    budget_s = 2.0  # 0.6 s is spent after 3 epochs: ~4 slow steps fit, and the time runs out within epoch 4
    out = _train(tmp_path, folder_data, "--time-budget", str(budget_s / 60), "--batch-size", "20")
    assert "re-fitted to the time left" in capsys.readouterr().out
    _assert_within_budget(out, budget_s, calls["n"])
    lr = _step_column(out, "lr")
    # the planned decay was spread over ~100+ steps; re-fitted, it reaches its end within the few slow steps
    assert lr[-1] <= 0.5 * lr[30], lr[28:]


@pytest.mark.parametrize("change", [("--small-crop", "24", "--small-crop-epochs", "3"),
                                    ("--model", "air-cpu-small-k1", "--whiten-bias-epochs", "3")],
                         ids=["image-size", "frozen-parameters"])
def test_time_budget_does_not_plan_at_the_pace_of_warm_up_steps(tmp_path, folder_data, monkeypatch, capsys,
                                                                 change):
    """Warm-up steps -- the run's first (a build, torch.compile) and the first after epoch 3 changes what a step
    trains (whole images after --small-crop; the whitening bias frozen), for which torch.compile recompiles --
    each take 2 s, the others 0.03-0.05 s: their time counts as spent, but neither the epoch-end re-plans nor the
    final epoch's re-fit plan the steps left at their pace. Planned at it, the run shrank its plan after epoch 1
    (its learning rate decayed 4x too fast) and ended 2.5 s early."""
    calls = _timed_steps(monkeypatch, lambda n: 2.0 if n in (1, 31) else 0.03 if n <= 30 else 0.05)
    budget_s = 8.0  # 2 + 29 x 0.03 + 2 = 4.87 s after step 31, then ~62 steps of 0.05 s
    out = _train(tmp_path, folder_data, "--time-budget", str(budget_s / 60), "--batch-size", "20",
                 "--warmup-epochs", "0", *change)
    text = capsys.readouterr().out
    assert "more steps (planned:" not in text.split("epoch   1.00")[1].split("epoch   2.00")[0]  # no shrink
    _assert_within_budget(out, budget_s, calls["n"])
    assert calls["n"] >= 85 and _step_seconds(out)[-1] >= budget_s - 0.15, (calls["n"], _step_seconds(out)[-3:])
    lr = _step_column(out, "lr")
    assert lr[30] >= 0.5 * lr[0], lr[:32]  # a linear decay over ~90 steps is at ~67% there


def test_time_budget_stops_before_a_step_that_would_end_past_it(tmp_path, folder_data, monkeypatch, capsys):
    """A step that suddenly takes the whole budget (the pace of the steps before it did not foresee it): the next
    step, which would end past the budget, is not started."""
    calls = _timed_steps(monkeypatch, lambda n: 0.02 if n <= 30 else 2.5)
    budget_s = 3.0  # 0.6 s is spent after 3 epochs: step 31 uses up the rest
    out = _train(tmp_path, folder_data, "--time-budget", str(budget_s / 60), "--batch-size", "20")
    assert "before the plan's end" in capsys.readouterr().out
    assert calls["n"] < 40
    _assert_within_budget(out, budget_s, calls["n"])


def _step_column(out, field: str) -> list[float]:
    """One column of steps.csv, one value per step."""
    column = train.STEP_FIELDS.index(field)
    return [float(line.split(",")[column]) for line in (out / "steps.csv").read_text().splitlines()[1:]]


def _step_seconds(out) -> list[float]:
    """steps.csv's cumulative training seconds, one per step."""
    return _step_column(out, "train_seconds")


def _timed_steps(monkeypatch, seconds) -> dict:
    """Training steps that take exactly seconds(n) for the n-th call (from 1) on the loop's clock, a virtual one that
    only these steps move: the plans under test see the same step times on a busy machine as on a quiet one (a
    sleep beside the real step did not: under load the real step's own time used up the small budgets). Returns
    the call counter ({"n": calls so far})."""
    from fastblock.train import loop

    real_step, calls, clock = loop._train_step, {"n": 0}, {"now": 0.0}

    def timed_step(*args, **kwargs):
        calls["n"] += 1
        clock["now"] += seconds(calls["n"])
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "_train_step", timed_step)
    loop_time = {name: getattr(time, name) for name in dir(time) if not name.startswith("_")}
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(**dict(loop_time, perf_counter=lambda: clock["now"])))
    return calls


def _assert_within_budget(out, budget_s: float, steps_run: int) -> None:
    """Training time within the budget give or take the last step, and the checkpoint's plan is the steps run."""
    summary = json.loads((out / "summary.json").read_text())
    seconds = _step_seconds(out)
    longest_step = max(b - a for a, b in zip(seconds, seconds[1:]))
    assert summary["train_seconds"] <= budget_s + longest_step, (summary, seconds)
    assert len(seconds) == steps_run == torch.load(out / "last.pt", weights_only=True)["plan"]["total_steps"]


def test_cpu_training_steps_run_in_the_extension_pool(tmp_path, folder_data, capsys):
    """On CPU with the extension the trainer switches its allocation pool on and runs steps and evaluations inside
    a pool scope (blocks are reused from step to step: hits); --cpu-pool-gib 0 leaves it alone."""
    from fastblock import extension

    if not fastblock.available_backends("cpu")["extension"].available:
        pytest.skip("needs the extension")
    limit = extension.cpu_pool_stats()["limit_bytes"]
    try:
        extension.set_cpu_pool_limit(0)
        _train(tmp_path, folder_data, "--epochs", "1", "--batch-size", "50", "--backend", "extension",
               "--cpu-pool-gib", "0", name="off")
        assert "allocation pool" not in capsys.readouterr().out
        assert extension.cpu_pool_stats()["limit_bytes"] == 0
        before = extension.cpu_pool_stats()["hits"]
        _train(tmp_path, folder_data, "--epochs", "1", "--batch-size", "50", "--backend", "extension",
               "--cpu-pool-gib", "0.5", name="on")
        assert "allocation pool keeps up to 0.5 GiB" in capsys.readouterr().out
        stats = extension.cpu_pool_stats()
        assert stats["limit_bytes"] == 2**29 and stats["hits"] > before
    finally:
        extension.set_cpu_pool_limit(limit)


def test_interrupt_saves_a_resumable_checkpoint(tmp_path, folder_data, monkeypatch, capsys):
    """Ctrl-C in the middle of an epoch: one line saying how to resume, exit code 130, no traceback; the resumed
    run ends exactly where the uninterrupted one does."""
    from fastblock.train import loop

    common = ["--epochs", "2", "--batch-size", "20", "--seed", "3", "--ema", "0.9"]
    full = _train(tmp_path, folder_data, *common, name="full")
    real_step, calls = loop._train_step, {"n": 0}

    def interrupted_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 13:  # epoch 2, step 3
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "_train_step", interrupted_step)
    argv = ["--data-dir", str(folder_data), "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--no-download",
            "--preset", "tiny", "--backend", "reference", "--out", str(tmp_path / "part"), *common]
    capsys.readouterr()
    assert train.main(argv) == 130
    out = capsys.readouterr().out
    assert f"--resume {tmp_path / 'part'}" in out and "Traceback" not in out
    monkeypatch.setattr(loop, "_train_step", real_step)
    resume = ["--resume", str(tmp_path / "part"), "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    assert train.main(resume) == 0
    a = torch.load(full / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    strip_time = lambda text: [",".join(r.split(",")[:7]) for r in text.splitlines()]  # noqa: E731
    assert strip_time((full / "metrics.csv").read_text()) == strip_time((tmp_path / "part" / "metrics.csv").read_text())


def test_out_never_overwrites_a_run(tmp_path, folder_data, capsys):
    out = _train(tmp_path, folder_data, "--epochs", "1", "--batch-size", "50")
    before = (out / "config.json").read_text()
    rc = train.main(["--data-dir", str(folder_data), "--cache-dir", str(tmp_path / "cache"), "--no-progress",
                     "--preset", "tiny", "--out", str(out), "--backend", "reference", "--batch-size", "20"])
    assert rc == 2 and f"--resume {out}" in capsys.readouterr().err
    assert (out / "config.json").read_text() == before


def test_resume_and_eval_only_refuse_options_they_would_ignore(tmp_path, folder_data, capsys):
    """--resume and --eval-only keep the settings the run was trained with: a setting given beside them (which they
    used to ignore silently) is a one-line error that names it, and nothing is written; a complete run resumed
    without --epochs says so and does nothing."""
    out = _train(tmp_path, folder_data, "--epochs", "1", "--batch-size", "50")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    common = ["--no-progress", "--cache-dir", str(tmp_path / "cache")]
    capsys.readouterr()
    assert train.main(["--resume", str(out), "--lr", "0.5", "--batch-size", "7", "--time-budget", "2", *common]) == 2
    err = capsys.readouterr().err
    assert "--batch-size, --lr, --time-budget would be ignored" in err and "--epochs extends it" in err
    assert train.main(["--eval-only", str(out), "--epochs", "3", "--seed", "1", *common]) == 2
    assert "--epochs, --seed would be ignored" in capsys.readouterr().err
    assert train.main(["--resume", str(out), *common]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_resume_goes_on_where_the_data_and_backend_are_now(tmp_path, folder_data, capsys):
    """A run resumed after its data moved (--data-dir) on another backend (--backend): both are taken, and said."""
    import shutil

    if not fastblock.available_backends("cpu")["extension"].available:
        pytest.skip("needs the extension")
    data = tmp_path / "data"
    shutil.copytree(folder_data, data)
    out = _train(tmp_path, data, "--epochs", "2", "--batch-size", "50", "--stop-after", "1")
    moved = data.rename(tmp_path / "moved")
    capsys.readouterr()
    assert train.main(["--resume", str(out), "--data-dir", str(moved), "--backend", "extension", "--no-progress",
                       "--cache-dir", str(tmp_path / "cache")]) == 0
    text = capsys.readouterr().out
    assert f"--data-dir {moved} (the run began with {data})" in text
    assert "--backend extension (the run began with reference)" in text and "backend: extension" in text
    assert len((out / "metrics.csv").read_text().splitlines()) == 1 + 2


def test_resume_with_more_epochs_extends_the_run(tmp_path, folder_data, capsys):
    out = _train(tmp_path, folder_data, "--epochs", "1", "--batch-size", "50")
    assert train.main(["--resume", str(out), "--epochs", "2", "--no-progress", "--cache-dir",
                       str(tmp_path / "cache")]) == 0
    assert "extending the run from 1 to 2 epochs" in capsys.readouterr().out
    assert len((out / "metrics.csv").read_text().splitlines()) == 3
    assert train.main(["--resume", str(out), "--epochs", "1", "--no-progress"]) == 2
    assert "already past" in capsys.readouterr().err


def test_subset_is_class_balanced_and_seeded(folder_data, tmp_path):
    data = fdata.load_cifar10(folder_data, tmp_path / "cache", progress=False)
    a, b = fdata.balanced_subset(data, 50, seed=1), fdata.balanced_subset(data, 50, seed=1)
    assert torch.equal(a.train_y, b.train_y) and len(a.train_y) == 50 and len(a.test_y) == 10
    assert torch.bincount(a.train_y, minlength=10).tolist() == [5] * 10
    assert not torch.equal(fdata.balanced_subset(data, 50, seed=2).train_x, a.train_x)


def test_data_dir_mistakes_create_nothing(tmp_path, monkeypatch, capsys):
    import torchvision.datasets

    monkeypatch.chdir(tmp_path)
    rc = train.main(["--data-dir", "nope.tar.gz", "--no-progress", "--preset", "tiny", "--out", "run1"])
    assert rc == 2 and "no archive at nope.tar.gz" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert train.main(["--data-dir", "empty", "--no-download", "--preset", "tiny", "--out", "run2"]) == 2
    assert "it is an empty folder" in capsys.readouterr().err
    assert train.main(["--data-dir", "missing", "--no-download", "--preset", "tiny", "--out", "run3"]) == 2
    assert "it does not exist" in capsys.readouterr().err

    def offline(root, *args, **kwargs):
        Path(root, "partial").mkdir(parents=True, exist_ok=True)  # a download that starts, then fails
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    assert train.main(["--preset", "tiny", "--out", "run4"]) == 2  # default --data-dir ./data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no data/, no nope.tar.gz/, no run dirs


def test_eval_only_takes_a_run_directory_and_rejects_other_files(tmp_path, folder_data, capsys):
    out = _train(tmp_path, folder_data, "--epochs", "1", "--batch-size", "50")
    common = ["--data-dir", str(folder_data), "--cache-dir", str(tmp_path / "cache"), "--backend", "reference",
              "--no-progress"]
    assert train.main(["--eval-only", str(out), *common]) == 0
    assert "best.pt" in capsys.readouterr().out
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert train.main(["--eval-only", str(text), *common]) == 2
    err = capsys.readouterr().err
    assert "is not a fastblock checkpoint" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    torch.save({"something": 1}, tmp_path / "other.pt")
    assert train.main(["--eval-only", str(tmp_path / "other.pt"), *common]) == 2
    assert "not a fastblock checkpoint" in capsys.readouterr().err


def test_default_preset_follows_the_device(tmp_path, folder_data, capsys, monkeypatch):
    """Without --preset: "cpu" without a GPU, "fast" with one, said on the first line."""
    from fastblock.train import presets

    assert presets.default_preset(torch.device("cpu"))[0] == "cpu"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a GPU")
    assert presets.default_preset(torch.device("cuda"))[0] == "fast"
    monkeypatch.undo()
    rc = train.main(["--data-dir", str(folder_data), "--cache-dir", str(tmp_path / "cache"), "--no-progress",
                     "--backend", "reference", "--out", str(tmp_path / "run"), "--subset", "40",
                     "--epochs", "0.1", "--model", "tiny", "--batch-size", "20"])
    assert rc == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("preset: cpu (the default here: no GPU")
    assert presets.PRESETS["fast"].model.startswith("air") and presets.PRESETS["cpu"].model.startswith("air")


def test_no_cuda_runtime_warning_on_cpu_machines():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", "import fastblock; print(fastblock.available_backends('cpu'))"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "No CUDA runtime" not in proc.stderr, proc.stderr


def test_precision_follows_the_gpu_architecture(monkeypatch):
    """--amp auto: bf16 where the GPU computes it natively (sm_80+), fp16 + GradScaler before; on CPU bf16 where
    it has bf16 matrix instructions (AMX / AVX512-BF16), else float32; the run's first line says which and why."""
    from fastblock.train import loop

    cfg = train.resolve_preset("fast")
    monkeypatch.setattr(loop, "cpu_bf16_native", lambda: None)
    assert loop.amp_dtype_for(cfg, torch.device("cpu")) is None
    assert loop.precision_note(cfg, torch.device("cpu")) == "float32"
    assert "emulated" in loop.precision_note(dict(cfg, amp="bf16"), torch.device("cpu"))  # forced: warned
    monkeypatch.setattr(loop, "cpu_bf16_native", lambda: "AMX")
    assert "emulated" not in loop.precision_note(dict(cfg, amp="bf16"), torch.device("cpu"))
    assert loop.amp_dtype_for(cfg, torch.device("cpu")) == torch.bfloat16
    assert "AMX" in loop.precision_note(cfg, torch.device("cpu"))
    assert loop.amp_dtype_for(dict(cfg, amp="off"), torch.device("cpu")) is None
    for capability, expected in (((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert loop.amp_dtype_for(cfg, torch.device("cuda")) == expected
        note = loop.precision_note(cfg, torch.device("cuda"))
        assert ("GradScaler" in note) == (expected == torch.float16) and f"{capability[0]}.{capability[1]}" in note
    assert loop.amp_dtype_for(dict(cfg, amp="off"), torch.device("cuda")) is None


# --- torch.compile, as the fast preset trains ------------------------------------------------------------------------
def _needs_extension():
    if not fastblock.available_backends("cpu")["extension"].available:
        pytest.skip("needs the extension")


def test_compiled_speed_run_network_matches_eager_mode():
    """The fast preset trains its network under torch.compile (inductor; on CPU here, where it generates C++ for
    everything but the extension's custom ops): loss, every gradient and the running statistics equal eager mode's,
    while the whitening bias trains and after it stops (a recompile, in which the first Block's input gradient is
    no longer wanted)."""
    import copy

    import torch.nn.functional as F

    _needs_extension()
    eager = build_model(train.resolve_preset("fast")["model"], backend="extension")
    eager.fit_to_data(torch.randn(256, 3, 32, 32))
    eager.dirac_init_()
    eager = eager.to(memory_format=torch.channels_last).train()
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin)
    x = torch.randn(12, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.arange(12) % 10
    for whiten_bias_trains in (True, False):
        results = []
        for model, call in ((eager, eager), (twin, compiled)):
            model.whiten.bias.requires_grad_(whiten_bias_trains)
            model.zero_grad(set_to_none=True)
            loss = F.cross_entropy(call(x), y, label_smoothing=0.2)
            loss.backward()
            grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
            results.append((loss.detach(), grads, {n: b.clone() for n, b in model.named_buffers()}))
        (loss_e, grads_e, bufs_e), (loss_c, grads_c, bufs_c) = results
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
        assert grads_c.keys() == grads_e.keys() and ("whiten.bias" in grads_e) == whiten_bias_trains
        for name, g in grads_e.items():
            torch.testing.assert_close(grads_c[name], g, rtol=1e-4, atol=1e-4 * g.abs().max().item(),
                                       msg=lambda m, name=name: f"{name}: {m}")
        for name, b in bufs_e.items():
            torch.testing.assert_close(bufs_c[name], b, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_compiled_training_run_follows_eager_and_saves_plain_weights(tmp_path, folder_data, capsys):
    """A --compile run (the fast preset's setting) of the fast preset on CPU: its first step's loss is eager mode's
    (the same weights, batch and network), it runs through the whitening bias's freeze (a recompile), and its
    checkpoints hold the model's own parameter names (not the compiled wrapper's), so --eval-only and --resume
    load them."""
    _needs_extension()
    common = ("--preset", "fast", "--backend", "extension", "--device", "cpu", "--epochs", "2", "--batch-size", "50",
              "--whiten-bias-epochs", "1", "--tta", "off")
    first_losses = []
    for flag in ("--compile", "--no-compile"):
        out = _train(tmp_path, folder_data, *common, flag, name=flag.strip("-"))
        rows = (out / "steps.csv").read_text().splitlines()
        assert len(rows) == 1 + 8, rows
        first_losses.append(float(rows[1].split(",")[3]))
    assert first_losses[0] == pytest.approx(first_losses[1], rel=1e-5, abs=1e-6)
    run = tmp_path / "compile"
    assert all(not k.startswith("_orig_mod") for k in torch.load(run / "best.pt", weights_only=True)["model"])
    capsys.readouterr()
    assert train.main(["--eval-only", str(run), "--data-dir", str(folder_data), "--cache-dir",
                       str(tmp_path / "cache"), "--backend", "extension", "--no-progress"]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert train.main(["--resume", str(run), "--epochs", "3", "--no-progress", "--data-dir", str(folder_data),
                       "--cache-dir", str(tmp_path / "cache")]) == 0
    assert len((run / "metrics.csv").read_text().splitlines()) == 1 + 3


# --- the speed-run settings of the cpu recipe ---------------------------------------------------------------------
def test_bn_bias_lr_scale_gives_the_shifts_their_own_group():
    model = build_model("tiny")
    cfg = dict(train.resolve_preset("tiny"), lr=0.1, weight_decay=1e-3, bn_bias_lr_scale=64.0)
    opt = train.make_optimizer(cfg, model)
    assert len(opt.param_groups) == 3
    bn_biases = {id(m.bias) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    fast = opt.param_groups[2]
    assert {id(p) for p in fast["params"]} == bn_biases
    assert fast["lr"] == pytest.approx(6.4) and fast["weight_decay"] == pytest.approx(1e-3 / 64)
    # the same decay per step as the weights: lr x weight_decay
    assert fast["lr"] * fast["weight_decay"] == pytest.approx(opt.param_groups[0]["lr"] * opt.param_groups[0][
        "weight_decay"])
    assert all(id(p) not in bn_biases for g in opt.param_groups[:2] for p in g["params"])
    # the scheduler scales every group by the same factor
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert opt.param_groups[2]["lr"] == pytest.approx(3.2) and opt.param_groups[0]["lr"] == pytest.approx(0.05)
    del sched
    assert len(train.make_optimizer(dict(cfg, bn_bias_lr_scale=1.0), model).param_groups) == 2


def test_warmup_as_a_fraction_of_the_run_from_a_start_factor():
    from fastblock.train.loop import Plan

    cfg = dict(train.resolve_preset("tiny"), schedule="linear", warmup_fraction=0.25, warmup_start=0.2,
               min_lr_ratio=0.07)
    plan = Plan(steps_per_epoch=10, total_steps=100)
    factors = [train.lr_factor(cfg, plan, s) for s in range(100)]
    assert factors[0] == pytest.approx(0.2 + 0.8 / 25) and factors[24] == pytest.approx(1.0)
    assert max(factors) == pytest.approx(1.0) and factors.index(max(factors)) in (24, 25)
    assert factors[-1] == pytest.approx(0.07 + 0.93 / 75)
    longer = Plan(steps_per_epoch=10, total_steps=200)  # the warm-up follows the run's length
    assert train.lr_factor(cfg, longer, 49) == pytest.approx(1.0)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("new_total", [60, 160])
def test_replan_goes_on_from_the_current_learning_rate(schedule, new_total):
    """A --time-budget re-plan after 40 of 100 steps to a shorter or longer run: the rate at step 40 stays where
    it was (no jump), the rest of the schedule is spread over the steps left (linear: a straight line from there
    to the floor at the new last step), and a plan rebuilt from the checkpoint's dict continues identically."""
    import dataclasses

    from fastblock.train.loop import Plan

    cfg = dict(train.resolve_preset("tiny"), schedule=schedule, warmup_epochs=1.0, min_lr_ratio=0.05)
    plan = Plan(steps_per_epoch=10, total_steps=100)
    before = [train.lr_factor(cfg, plan, s) for s in range(41)]
    plan.replan(new_total, 40)
    after = [train.lr_factor(cfg, plan, s) for s in range(40, new_total)]
    assert after[0] == before[40]
    assert all(b < a for a, b in zip(after, after[1:]))
    assert train.lr_factor(cfg, plan, new_total) == pytest.approx(0.05)  # the floor, at the run's new end
    if schedule == "linear":
        step = (before[40] - 0.05) / (new_total - 40)
        assert [a - b for a, b in zip(after, after[1:])] == pytest.approx([step] * (new_total - 41))
    resumed = Plan(**dataclasses.asdict(plan))
    assert [train.lr_factor(cfg, resumed, s) for s in range(40, new_total)] == after
    # a second re-plan bends the schedule again, from where the first left it
    mid = train.lr_factor(cfg, plan, 50)
    plan.replan(new_total + 20, 50)
    assert train.lr_factor(cfg, plan, 50) == pytest.approx(mid, abs=1e-12)
    assert train.lr_factor(cfg, plan, new_total + 20) == pytest.approx(0.05)


def test_time_budget_replans_keep_the_learning_rate_continuous(tmp_path, folder_data, monkeypatch, capsys):
    """Steps that get 3x faster after the first epoch: the epoch-end re-plan fits more steps, and the learning rate
    goes on falling from where it was (a re-plan that re-spans the decay over the longer run makes it jump up)."""
    _timed_steps(monkeypatch, lambda n: 0.06 if n <= 10 else 0.02)  # 10 steps = the first epoch
    out = _train(tmp_path, folder_data, "--time-budget", str(2.4 / 60), "--batch-size", "20")
    assert "more steps (planned:" in capsys.readouterr().out
    lrs = _step_column(out, "lr")
    assert len(lrs) > 12 and all(b <= a for a, b in zip(lrs, lrs[1:])), lrs


def test_lookahead_continues_from_the_average():
    from fastblock.train import loop

    torch.manual_seed(0)
    model = build_model("tiny")
    avg = loop.make_ema(model, 0.9, warmup=False)
    before = {k: v.clone() for k, v in avg.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model.body[0].bn.running_mean.add_(2.0)
    moved = {k: v.clone() for k, v in model.state_dict().items()}
    loop.lookahead_update(avg, model, decay=0.75)
    for k, v in model.state_dict().items():
        assert torch.equal(v, avg.module.state_dict()[k]), k  # the model continues from the average
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.75 * before[k] + 0.25 * moved[k])
    cfg = dict(train.resolve_preset("tiny"), ema=0.8)
    plan = loop.Plan(steps_per_epoch=10, total_steps=100)
    assert loop.lookahead_decay(cfg, plan, 0) == 0.0 and loop.lookahead_decay(cfg, plan, 100) == pytest.approx(0.8)
    assert loop.lookahead_decay(cfg, plan, 50) == pytest.approx(0.8 / 8)


def test_dirac_init_makes_the_first_branch_an_identity():
    model = build_model("air-cpu-small")
    model.dirac_init_()
    x = torch.randn(2, 24, 8, 8)
    first = model.body[0]
    y = torch.nn.functional.conv2d(x, first.weight[0], padding=1)
    torch.testing.assert_close(y[:, :24], x)  # 24 -> 32 channels: the first 24 pass through
    second = model.body[2]
    assert torch.count_nonzero(second.weight[0] - torch.nn.init.dirac_(torch.empty_like(second.weight[0]))) == 0
    assert not torch.equal(second.weight[1], second.weight[0])  # the other branch stays random


def test_speed_run_settings_train_and_resume_from_old_configs(tmp_path, folder_data, capsys):
    out = _train(tmp_path, folder_data, "--epochs", "2", "--batch-size", "20", "--lookahead", "--ema", "0.77",
                 "--ema-every", "2", "--bn-bias-lr-scale", "8", "--bn-momentum", "0.4", "--warmup-fraction", "0.2",
                 "--warmup-start", "0.2", "--min-lr-ratio", "0.07", "--stop-after", "1")
    ckpt = torch.load(out / "last.pt", weights_only=False)
    for key in ("lookahead", "bn_bias_lr_scale", "bn_momentum", "warmup_fraction", "warmup_start", "dirac"):
        assert key in ckpt["config"]
    # a run recorded before these settings existed resumes with their defaults
    for key in ("lookahead", "bn_momentum", "warmup_fraction", "warmup_start", "dirac"):
        del ckpt["config"][key]
    ckpt["config"]["bn_bias_lr_scale"] = 8.0
    torch.save(ckpt, out / "last.pt")
    assert train.main(["--resume", str(out), "--no-progress", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert len((out / "metrics.csv").read_text().splitlines()) == 3
    capsys.readouterr()
    _train(tmp_path, folder_data, "--epochs", "0.2", "--batch-size", "20", "--dirac", name="d")
    assert "dirac: model 'tiny' has no identity initialisation" in capsys.readouterr().out


def test_whitening_bias_trains_for_its_epochs_only(tmp_path, folder_data):
    out = _train(tmp_path, folder_data, "--model", "air-cpu-small", "--epochs", "2", "--batch-size", "50",
                 "--whiten-bias-epochs", "1", "--stop-after", "1")
    after_one = torch.load(out / "last.pt", weights_only=False)["model"]["whiten.bias"]
    assert torch.count_nonzero(after_one) > 0  # it trained in the first epoch (it starts at zero)
    assert train.main(["--resume", str(out), "--no-progress", "--cache-dir", str(tmp_path / "cache")]) == 0
    final = torch.load(out / "last.pt", weights_only=False)["model"]
    assert torch.equal(final["whiten.bias"], after_one)  # and stayed fixed in the second


def test_gelu_after_the_whitening_separates_its_sign_pairs():
    plain, gelu = build_model("air-cpu-wide-k1"), build_model("air-cpu-wide-k1-gelu")
    x = torch.randn(2, 3, 32, 32)
    for model in (plain, gelu):
        model.fit_to_data(torch.randn(64, 3, 32, 32))
    half = plain.whiten.out_channels // 2
    linear = plain.whiten_act(plain.whiten(x))
    torch.testing.assert_close(linear[:, half:] - plain.whiten.bias[half:, None, None],
                               -(linear[:, :half] - plain.whiten.bias[:half, None, None]))
    act = gelu.whiten_act(gelu.whiten(x))
    assert isinstance(gelu.whiten_act, torch.nn.GELU) and (act > -0.2).all()


def test_tta_views_are_symmetric_and_weighted():
    from fastblock.train.loop import tta_views

    x = torch.arange(2 * 3 * 5 * 4, dtype=torch.float32).view(2, 3, 5, 4)
    assert [w for w, _ in tta_views(x, False)] == [1.0]
    assert [w for w, _ in tta_views(x, True)] == [0.5, 0.5]
    views = tta_views(x, "flip-translate")
    assert sum(w for w, _ in views) == 1.0 and len(views) == 6
    _, (_, mirror), (_, up_left), _, (_, down_right), _ = views
    assert torch.equal(mirror, x.flip(3))
    torch.testing.assert_close(up_left[:, :, 1:, 1:], x[:, :, :-1, :-1])      # content moved down-right by one
    torch.testing.assert_close(down_right[:, :, :-1, :-1], x[:, :, 1:, 1:])   # and up-left by one
    torch.testing.assert_close(up_left[:, :, 0, 1:], x[:, :, 1, :-1])         # reflect padding at the border
    every = tta_views(x, "flip-translate-all")
    assert len(every) == 18 and all(w == 1 / 18 for w, _ in every)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    shifts = {(i, j): padded[:, :, i:i + 5, j:j + 4] for i in range(3) for j in range(3)}
    for (i, j), view in shifts.items():  # each shift once, and its mirror once
        assert sum(torch.equal(v, view) for _, v in every) == 1
        assert sum(torch.equal(v, view.flip(3)) for _, v in every) == 1
    assert torch.equal(shifts[1, 1], x)


@pytest.mark.parametrize("tta", [False, True, "flip-translate", "flip-translate-all"])
def test_evaluation_reports_the_plain_view_from_the_tta_pass(tta, monkeypatch):
    """The accuracy without TTA comes from the TTA pass's unaugmented view (no second pass over the test set): it
    equals a separate one-view evaluation's, and the TTA accuracy is the weighted views' own."""
    from fastblock.train.loop import Dist, evaluate, tta_views

    monkeypatch.delenv("WORLD_SIZE", raising=False)  # one process
    single = Dist("cpu")
    gen = torch.Generator().manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 10))
    images = torch.randint(0, 256, (37, 3, 8, 8), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (37,), generator=gen)
    mean, std = torch.full((1, 3, 1, 1), 120.0 / 255), torch.full((1, 3, 1, 1), 0.25)
    args = (images, labels, mean, std, 16, None, False)
    cpu = torch.device("cpu")
    result = evaluate(model, *args, tta, single, cpu)
    plain = evaluate(model, *args, False, single, cpu)
    assert result.plain_acc == plain.acc == plain.plain_acc and 0 < plain.acc < 1
    with torch.no_grad():  # the TTA accuracy is the weighted views' accuracy, whatever the plain view says
        x = (images.float() / 255 - mean) / std
        logits = sum(w * model(v) for w, v in tta_views(x, tta))
    assert result.acc == (logits.argmax(1) == labels).sum().item() / len(labels)
    assert sum(v is x for _, v in tta_views(x, tta)) == 1
