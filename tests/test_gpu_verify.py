"""bench/gpu_verify.sh, the one short GPU verification run, smoke-run on CPU (GPU_VERIFY_QUICK=1)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_verify.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and timeout")


def _run(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUT=str(tmp_path / "out"), GPU_VERIFY_QUICK="1", GPU_VERIFY_RUNS=str(tmp_path / "runs"),
               FASTBLOCK_CACHE=str(tmp_path / "cache"), PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1500)


def test_the_worst_case_fits_eight_minutes():
    """Every stage running into its box (and the kill grace after it) still ends within 8 minutes: the three
    parallel lanes, then doctor, bench and train one at a time."""
    import re

    text = SCRIPT.read_text()
    build, triton, ext, data, warm, doctor, bench, train = map(
        int, re.search(r"^  boxes=\(([\d ]+)\)  #", text, re.M).group(1).split())
    grace = int(re.search(r"--kill-after=(\d+)", text).group(1))
    lanes = max(triton + grace, build + ext + 2 * grace, data + warm + 2 * grace)
    worst = lanes + doctor + bench + train + 3 * grace
    assert worst <= 470, worst  # the rest of the 480 s: the version line and the benchmark report


def test_all_stages_smoke(tmp_path):
    from torchvision.io import write_png

    data = tmp_path / "data"
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 200), ("test", 40)):
        for i in range(n):
            d = data / split / f"class{i % 10}"
            d.mkdir(parents=True, exist_ok=True)
            write_png((torch.rand(3, 32, 32, generator=g) * 255).to(torch.uint8), str(d / f"{i}.png"))
    proc = _run(tmp_path, str(data))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    names = sorted(p.name for p in out.iterdir())
    assert len(names) <= 8, names
    for expected in ("build.log", "tests.log", "doctor.txt", "bench.json", "report.md", "train.log", "summary.json",
                     "status.txt"):
        assert expected in names, names
    status = (out / "status.txt").read_text()
    for name in ("build", "tests-triton", "data", "warm", "tests-ext", "doctor", "bench", "train"):
        assert f"{name} exit 0" in status, status
    assert "torch" in (out / "build.log").read_text()
    assert "all checks passed" in (out / "doctor.txt").read_text()
    assert json.loads((out / "summary.json").read_text())["epochs"] == 1.0


def test_a_failing_stage_is_recorded_and_the_rest_runs(tmp_path):
    proc = _run(tmp_path, str(tmp_path / "no-such-data"))
    assert proc.returncode == 1
    status = (tmp_path / "out" / "status.txt").read_text()
    assert "doctor exit 0" in status and "data exit 1" in status and "train exit 2" in status, status
    assert "warm" not in status  # nothing to warm up without data
