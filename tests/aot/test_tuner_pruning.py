"""The tuner's pruning before timing, from real ahead-of-time compiles (no GPU): a configuration that
spills, passes the shared-memory limit or loses the tensor-core instructions of the default is rejected
with its reason; the default is kept."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # four AOT compiles (~5 s)

SCRIPT = r"""
import json, sys, torch, sparsec
from sparsec.runtime import ops, tuner
from sparsec.runtime.launch import LaunchConfig as C
layer = sparsec.SparseLinear(512, 256, spec="2:4")
key = ops._key(layer.values, *layer.layout.op_key)
big = (("BLOCK_B", 128), ("BLOCK_K", 128), ("BLOCK_O", 128))
cases = {
    "default": ("forward", C(), 90),
    "small batch tile": ("forward", C((("BLOCK_B", 16),)), 90),
    "big tiles, 4 warps": ("forward", C(big, 4, 4), 90),
    "big tiles, 8 warps, 4 stages": ("grad_values", C(big, 8, 4), 80),
}
reasons = {name: tuner.compile_problem(p, key, torch.float16, 64, c, cc) for name, (p, c, cc) in cases.items()}
json.dump(reasons, sys.stdout)
"""


def test_pruning_rejects_spills_shared_memory_and_lost_tensor_cores():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real jit functions: AOT compiles
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    reasons = json.loads(done.stdout)
    assert reasons["default"] is None
    assert reasons["small batch tile"].startswith("loses wgmma on sm_90")  # M = 16: mma.sync, not wgmma
    assert reasons["big tiles, 4 warps"].startswith("ptxas spills")
    assert reasons["big tiles, 8 warps, 4 stages"] == (
        "needs 196608 bytes of shared memory; sm_80 gives a block 166912"
    )
