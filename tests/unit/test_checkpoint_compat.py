"""Checkpoints written before the restructuring (sparsec 0.1.0, commit e1552ba) still load, and training on
from one gives bit-identically what that version gave training straight through.

tests/unit/data/v0.1.0-ckpt.pt and v0.1.0-straight.pt were written by that commit's
``tests/unit/checkpoint_run.py first`` and ``straight`` (rigl on fan-in, SET on blocks, snfs across two
layers, gmp shrinking a conv, Adam): the resume below runs today's code on the old checkpoint.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
DATA = HERE / "data"


@pytest.mark.slow  # over 2 s
def test_a_v0_1_0_checkpoint_resumes_bit_identically(tmp_path):
    out = tmp_path / "resumed.pt"
    script = HERE / "checkpoint_run.py"
    env = {**os.environ, "SPARSEC_BACKEND": "cpu"}  # bit-identical to the backend v0.1.0 ran (PyTorch's CSR)
    subprocess.run(
        [sys.executable, str(script), "resume", str(DATA / "v0.1.0-ckpt.pt"), str(out)],
        check=True,
        timeout=300,
        env=env,
    )
    want, got = torch.load(DATA / "v0.1.0-straight.pt"), torch.load(out)
    assert want["model"].keys() == got["model"].keys()
    for key, x in want["model"].items():
        y = got["model"][key]
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, key
    for pid, state in want["opt"]["state"].items():
        for name, tensor in state.items():
            assert torch.equal(tensor, got["opt"]["state"][pid][name]), (pid, name)
