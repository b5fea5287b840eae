"""Every code block of README.md works as pasted: Python blocks run; shell lines that call fastblock's command-line
tools parse with those tools' own argument parsers (training itself is covered by tests/test_train.py)."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S)
PYTHON_BLOCKS = [body for lang, body in BLOCKS if lang == "python"]
SHELL_LINES = [line.split("  #")[0].strip() for lang, body in BLOCKS if lang == "" for line in body.splitlines()
               if re.match(r"\s*(python|torchrun|pip|pytest|FASTBLOCK_\w+=)", line)]


def test_readme_has_blocks():
    assert PYTHON_BLOCKS and any("fastblock.train" in line for line in SHELL_LINES)


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_block_runs(index):
    proc = subprocess.run([sys.executable, "-c", PYTHON_BLOCKS[index]], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("line", SHELL_LINES)
def test_shell_line_is_valid(line):
    words = shlex.split(line)
    while words and re.match(r"\w+=", words[0]):  # environment assignments
        words.pop(0)
    if words[0] in ("pip", "pytest"):
        return  # the install and test commands are what CI itself runs
    if words[0] == "torchrun":
        words = ["python", *words[words.index("-m"):]]
    assert words[:2] == ["python", "-m"], line
    module, args = words[2], words[3:]
    if module == "fastblock.train":
        from fastblock.train import build_parser

        build_parser().parse_args(args)  # SystemExit on an unknown flag or a bad value
        return
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{module}: {proc.stderr[-2000:]}"
