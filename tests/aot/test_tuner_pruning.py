"""The tuner's pruning before timing, from real ahead-of-time compiles (no GPU): a configuration that
spills, passes the shared-memory limit or loses the tensor-core instructions of the default is rejected
with its reason; the default is kept."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # AOT compiles (~5 s, ~20 s)

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


GRID_SCRIPT = r"""
import json, sys, torch, sparsec
from sparsec.runtime import ops, tuner
from sparsec.runtime.launch import LaunchConfig as C
out = {}
for spec in ("2:4", "90%", "block(16x16, 50%)", "fanin(k=7)"):
    layer = sparsec.SparseLinear(512, 256, spec=spec)
    key = ops._key(layer.values, *layer.layout.op_key)
    for program, config in (("forward", C((("GROUP", 8),))), ("grad_input", C((("GROUP", 4),))),
                            ("grad_values", C((("SPLIT", 4),))), ("grad_values", C((("GROUP", 8), ("SPLIT", 2))))):
        if dict(config.tile).keys() - tuner.default_tile(program, key, torch.float16).keys():
            continue
        for cc in (80, 90):
            out[f"{spec} {program} {config.text()} sm_{cc}"] = tuner.compile_problem(
                program, key, torch.float16, 256, config, cc)
json.dump(out, sys.stdout)
"""


def test_grouped_and_split_kernels_compile_and_keep_their_tensor_cores():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", GRID_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    reasons = json.loads(done.stdout)
    assert len(reasons) == 2 * (4 * 3 + 1)  # every structure's products and gradient; N:M's grouped gradient too
    assert all(r is None for r in reasons.values()), {k: r for k, r in reasons.items() if r is not None}
