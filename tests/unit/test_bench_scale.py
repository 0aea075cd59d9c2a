"""bench/scale.py's runs work end to end on a small model: every variant reports its figures, and only the
RigL variant updates its masks."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCALE = Path(__file__).resolve().parents[2] / "bench" / "scale.py"


def _child(**args) -> dict:
    spec = {"h": 96, "spec": "90%", "steps": 6, "delta_t": 2, "lr": 0.1, "budget_s": 60.0, **args}
    done = subprocess.run(
        [sys.executable, str(SCALE), "--child", json.dumps(spec)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # three processes (~10 s)
@pytest.mark.parametrize("variant", ["dense", "static", "rigl"])
def test_each_variant_reports_its_figures(variant):
    r = _child(variant=variant)
    assert r["variant"] == variant and r["steps"] == 6 and r["peak_rss_gb"] > 0
    assert r["dense_params"] == 1024 * 96 + 96 * 96 + 960
    if variant == "dense":
        assert r["kept"] == r["dense_params"] and r["rebuild_s"] is None and r["updates"] == 0
    else:
        assert r["kept"] < r["dense_params"] / 5 and r["rebuild_s"] is not None
    assert (r["updates"] > 0) == (variant == "rigl")  # every delta_t steps, RigL only
