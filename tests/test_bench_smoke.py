"""The benchmark suite's smoke mode (one round, tiny shapes) and its report, so neither can rot."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_suite_smoke_and_report(tmp_path):
    out = tmp_path / "smoke.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "bench/", "--smoke", "-q", "-p", "no:cacheprovider",
                           f"--benchmark-json={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert out.exists()
    png = tmp_path / "speedup.png"
    proc = subprocess.run([sys.executable, "-m", "bench.report", str(out), "--markdown", "--plot", str(png)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| fwdbwd N4-C8-8x8-K2 float32 | reference |" in proc.stdout
    assert png.stat().st_size > 1000


def test_interleaved_ab_tool():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench.interleaved", "--n", "2", "--c", "4", "--hw", "6", "--k", "2",
                           "--rounds", "3", "--device", "cpu", "--providers", "reference,dynconv"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 interleaved rounds" in proc.stdout
    assert "1.00x" in proc.stdout and "dynconv" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "bench.interleaved", "--device", "cpu",
                          "--providers", "reference,triton"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "not available" in bad.stderr


def test_bench_tools_bad_input_is_a_one_line_error(tmp_path):
    """A missing or foreign results file, a folder that is not a run, a zero round count: argparse's one-line
    error (exit 2), not a traceback."""
    (tmp_path / "other.json").write_text('{"a": 1}')
    cases = [(["bench.report", str(tmp_path / "none.json")], "No such file or directory"),
             (["bench.report", str(tmp_path / "other.json")], "not a pytest-benchmark JSON file"),
             (["bench.plot_runs", str(tmp_path), "--out", str(tmp_path / "p.png")], "not a run directory"),
             (["bench.interleaved", "--rounds", "0"], "argument --rounds: must be >= 1, got 0")]
    for argv, message in cases:
        proc = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, (argv, proc.stderr)
