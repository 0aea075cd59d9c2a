"""save -> load in a new process -> train gives bit-identical masks, values and optimizer state."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparsec

SCRIPT = Path(__file__).with_name("checkpoint_run.py")


def _run(*args):
    subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], check=True, timeout=300)


@pytest.mark.slow  # three training processes
def test_resumed_training_is_bit_identical_to_straight_training(tmp_path):
    _run("straight", tmp_path / "straight.pt")
    _run("first", tmp_path / "ckpt.pt")
    _run("resume", tmp_path / "ckpt.pt", tmp_path / "resumed.pt")
    a, b = torch.load(tmp_path / "straight.pt"), torch.load(tmp_path / "resumed.pt")
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        x, y = a["model"][key], b["model"][key]
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, key
    for pid, state in a["opt"]["state"].items():
        for name, tensor in state.items():
            assert torch.equal(tensor, b["opt"]["state"][pid][name]), (pid, name)
    # the run changed masks after the save point, so the comparison covers updates
    ckpt = torch.load(tmp_path / "ckpt.pt")
    changed = [
        k
        for k in ckpt["model"]
        if k.endswith(("col_indices", "fanin_indices", "block_cols"))
        and not torch.equal(ckpt["model"][k], a["model"][k])
    ]
    assert changed


def test_updater_state_checks():
    layer = sparsec.SparseLinear(8, 4, spec="50%")
    state = sparsec.MaskUpdater(layer, None, total_steps=10).state_dict()
    with pytest.raises(sparsec.SparsecError, match="total_steps=10, this updater has 20"):
        sparsec.MaskUpdater(layer, None, total_steps=20).load_state_dict(state)
    state["masks"][""]["col_indices"][:] = 0
    with pytest.raises(sparsec.ShapeError, match="mask in the checkpoint"):
        sparsec.MaskUpdater(layer, None, total_steps=10).load_state_dict(state)
