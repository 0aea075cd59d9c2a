"""examples/char_lm.py runs end to end on a few steps: every method trains, the table and plot are written,
the held-out split is the text's last 10%, and small_dense fits RigL's kept-weight budget."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _example():
    spec = importlib.util.spec_from_file_location("char_lm", ROOT / "examples" / "char_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_held_out_text_is_the_last_tenth():
    import pydoc_data.topics

    char_lm = _example()
    train, val, vocab = char_lm.load_text()
    n = sum(len(v) for v in pydoc_data.topics.topics.values()) + len(pydoc_data.topics.topics) - 1  # joined by \n
    assert len(train) + len(val) == n and len(train) == int(0.9 * n)
    assert vocab == int(torch.cat([train, val]).max()) + 1 > 90  # real English text, symbols and all


@pytest.mark.slow  # about 4 s: five short trainings
def test_every_method_trains_and_the_small_dense_model_fits_the_budget(tmp_path, capsys):
    char_lm = _example()
    plot = tmp_path / "curves.png"
    args = ["--steps", "3", "--eval-every", "3", "--eval-windows", "2", "--no-results", "--plot", str(plot)]
    assert char_lm.main([*args, "--d-model", "64", "--layers", "1"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line.split("|") for line in out.splitlines() if line.startswith("| ")}
    assert set(char_lm.METHODS) <= set(rows)
    rigl, small = int(rows["rigl"][3].strip().replace(",", "")), int(rows["small_dense"][3].strip().replace(",", ""))
    assert rigl == pytest.approx(0.1 * 12 * 64 * 64, rel=0.02)  # 90% of one block's 12 d^2 projections
    assert small <= rigl < 12 * (int(rows["small_dense"][2]) + 4) ** 2  # the widest that fits (steps of 4 heads)
    for method in char_lm.METHODS:
        bpc = float(rows[method][5])
        assert math.isfinite(bpc) and 0 < bpc < 8
    assert plot.stat().st_size > 0
