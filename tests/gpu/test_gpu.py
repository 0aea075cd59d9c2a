"""GPU checks (tests/gpu/checks.py), each in a subprocess without TRITON_INTERPRET; skipped without CUDA.

Not yet run on a GPU: no GPU has been lent to this project's sessions (README, "How kernels are checked").
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available())")
CHECKS = Path(__file__).with_name("checks.py")


@pytest.mark.parametrize(
    "check",
    [
        ("kernels", "fp32"),
        ("kernels", "tf32"),
        ("kernels", "fp16"),
        ("kernels", "bf16"),
        ("rigl", "fp16"),
        ("rigl", "bf16"),
        ("autocast",),
        ("second_device",),
        ("cuda_graphs",),
        ("tuner",),
        ("export",),
    ],
    ids="-".join,
)
def test_on_the_gpu(check):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(CHECKS), *check], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
