"""The benchmark command runs and reports what it promises (figures are not checked here:
they come from running it, see README)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # make test-fast leaves these out

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    proc = subprocess.run([sys.executable, "-m", "cmal.tools.bench", *args], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_step_benchmark_reports():
    out = _run("--layers=1,1,1,1", "--width_factor=0.125", "--head_mid=16", "--head_features=32",
               "--head_hidden=16", "--image_size=64", "--batch_size=2", "--iters=1", "--warmup=0",
               "--device=cpu", "--threads=1")
    assert re.search(r"matmul \(float32, 4096\^2\): [\d.]+ GFLOP/s", out)
    for label in ("train_step", "evaluate"):
        assert re.search(label + r" *: +[\d.]+ img/s +peak memory +\d+ MB +[\d.]+ GFLOP/img +"
                         r"[\d.]+ GFLOP/s \(\d+% of matmul\)", out), out


def test_loader_benchmark_reports():
    out = _run("--loader", "--images=4", "--jpeg_size=600x400", "--workers=0", "--batch_size=2")
    assert re.search(r"plain +: +[\d.]+ img/s", out) and re.search(r"fast_decode +: +[\d.]+ img/s", out)
    assert "differs from the reference transform's by" in out


def test_compare_prints_a_table_against_the_reference_set_up():
    out = _run("--compare", "--rows=0,1,3", "--layers=1,1,1,1", "--width_factor=0.125",
               "--head_mid=16", "--head_features=32", "--head_hidden=16", "--image_size=64",
               "--batch_size=2", "--iters=1", "--warmup=0", "--device=cpu", "--threads=1")
    rows = [line for line in out.splitlines() if line.startswith("| ") and "img/s" not in line]
    assert [r.split(" | ")[0] for r in rows] == ["| reference set-up: fp32, eager, InPlaceABN, "
                                                 "SGD per parameter", "| fp32, eager, foreach SGD",
                                                 "| bf16, native ABN, eager, foreach SGD"], out
    number = r"[\d.]+"
    for row in rows:
        assert re.fullmatch(rf"\| .+ \| {number} \| {number}x \| {number} GiB \| [\d,]+ \| "
                            rf"{number} \| {number}x \|", row), row
    ops = [int(row.split(" | ")[4].replace(",", "")) for row in rows]
    # foreach SGD zeroes and updates each of the 8 groups' parameters in a few operations
    assert ops[1] < ops[0]
    assert " | 1.00x | " in rows[0] and rows[0].endswith(" 1.00x |")
