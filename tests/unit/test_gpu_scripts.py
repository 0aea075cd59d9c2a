"""bench/gpu_check.py and bench/bench_gpu.py are what a person with a GPU runs: their timing code runs here on the
CPU (``--dry-run``: Triton's interpreter), and without a GPU they say so and run nothing."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _dry_run(script: str) -> list[str]:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, str(BENCH / script), "--dry-run"], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout.splitlines()


@pytest.mark.slow  # over 2 s
def test_the_gpu_check_runs_its_timing_code_on_the_cpu():
    lines = _dry_run("gpu_check.py")
    for spec in ("dense", "90%", "2:4", "block(32x32, 90%)", "fanin(90%)"):
        assert any(line.startswith(spec) and "forward+backward" in line for line in lines), spec
    for spec in ("90%", "2:4", "block(16x16,"):  # RigL's update step on the generated kernels, with its budget
        rows = [line for line in lines if line.startswith(spec) and " update | " in line]
        assert len(rows) == 1 and float(rows[0].split("|")[9]) > 0, (spec, rows)
    assert any(line.startswith("grow 64 x 48") and "torch.mm" in line for line in lines)


@pytest.mark.slow  # over 2 s
def test_the_gpu_bench_runs_its_timing_code_on_the_cpu():
    lines = _dry_run("bench_gpu.py")
    assert {"90%", "2:4", "block(32x32,", "fanin(90%)"} <= {line.split(" ", 1)[0] for line in lines}
    assert all("'sparsec': (" in line and "'CSR': (" in line for line in lines)


@pytest.mark.parametrize("script", ["gpu_check.py", "bench_gpu.py"])
def test_without_a_gpu_it_says_so_and_runs_nothing(script):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run([sys.executable, str(BENCH / script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stdout
