"""bench/bench_gpu.py is what a person with a GPU runs; its timing code runs here on the CPU (interpreter)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "bench_gpu.py"


@pytest.mark.slow  # over 2 s
def test_the_gpu_bench_runs_its_timing_code_on_the_cpu():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run"], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    printed = {line.split(" ", 1)[0] for line in done.stdout.splitlines()}
    assert {"90%", "2:4", "block(32x32,", "fanin(90%)"} <= printed
    assert all("'sparsec': (" in line and "'CSR': (" in line for line in done.stdout.splitlines())


def test_without_a_gpu_it_says_so_and_runs_nothing():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stdout
