"""bench/gpu_session.sh, the GPU checks for a machine with a GPU, smoke-run on CPU (GPU_SESSION_QUICK=1)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_session.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(tmp_path, *args, **env):
    full_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full_env.update(OUT=str(tmp_path / "out"), GPU_SESSION_QUICK="1", GPU_SESSION_RUNS=str(tmp_path / "runs"),
                    GPU_SESSION_CACHE=str(tmp_path / "cache"), PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=900)


def test_usage_and_missing_data(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 2 and "gpu_session.sh check" in proc.stdout
    proc = _run(tmp_path, "train", "reference", GPU_SESSION_DATA=str(tmp_path / "nowhere.tar.gz"))
    assert proc.returncode == 2 and "no data at" in proc.stderr


def test_stages_smoke(tmp_path):
    from torchvision.io import write_png

    data = tmp_path / "data"
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 200), ("test", 40)):
        for i in range(n):
            d = data / split / f"class{i % 10}"
            d.mkdir(parents=True, exist_ok=True)
            write_png((torch.rand(3, 32, 32, generator=g) * 255).to(torch.uint8), str(d / f"{i}.png"))
    for stage in (["check"], ["tests"], ["bench"], ["train", "reference"]):
        proc = _run(tmp_path, *stage, GPU_SESSION_DATA=str(data))
        assert proc.returncode == 0, f"{stage}: " + proc.stdout[-3000:] + proc.stderr[-3000:]
    # a failing step fails the stage (triton cannot run on CPU without the interpreter)
    assert _run(tmp_path, "train", "triton", GPU_SESSION_DATA=str(data)).returncode == 1
    out = tmp_path / "out"
    names = sorted(p.name for p in out.iterdir())
    for expected in ("versions.txt", "extension.log", "tests.log", "bench.json", "speedup.png",
                     "reference-summary.json", "reference-metrics.csv", "train-reference.log"):
        assert expected in names, names
    assert "torch" in (out / "versions.txt").read_text()
    summary = json.loads((out / "reference-summary.json").read_text())
    assert summary["epochs"] == 1 and 0.0 <= summary["best_test_acc"] <= 100.0
