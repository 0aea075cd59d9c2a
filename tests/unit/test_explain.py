import subprocess
import sys

import pytest
import torch
from torch import nn

import sparsec
from sparsec.cli import main
from sparsec.explainer import explain, explain_spec
from sparsec.formats import make_layout
from sparsec.runtime import tuner
from sparsec.runtime.devices import cpu_device
from sparsec.runtime.tunecache import TuneCache
from sparsec.spec import parse_spec


def test_explain_cli_shows_every_stage(capsys):
    assert main(["explain", "block(32x32, 90%)", "--shape", "256x512", "--dtype", "bf16", "--activation", "gelu"]) == 0
    text = capsys.readouterr().out
    for needle in (
        "format: bsr   strategy: block-dot",
        "passes: choose_format -> check_constraints -> fuse_epilogue -> tile -> cost_model",
        "== forward: IR as built",
        "%5 = activation(%4) : bf16[B, O] {fn='gelu'}",
        "== forward: IR after the passes",
        "activation='gelu', bias=True",
        "cost model at batch 4096 (bf16",
        "model output, not measurements",
        "grad_values  H100",
        "== grad_input: generated Triton source (bsr_spmm.py.jinja)",
        "== grow_scores: generated Triton source (bsr_grow.py.jinja)",
        "grow_scores  A100",
        "@triton.jit",
    ):
        assert needle in text, needle


def test_explain_cli_errors_carry_the_caret(capsys):
    assert main(["explain", "4:2", "--shape", "8x8"]) == 2
    err = capsys.readouterr().err
    assert "N must be smaller than M in an N:M spec\n  4:2\n  ^" in err
    with pytest.raises(SystemExit):
        main(["explain", "2:4", "--shape", "8by8"])


def test_console_script_entry_point():
    done = subprocess.run(
        [sys.executable, "-m", "sparsec.cli", "explain", "2:4", "--shape", "64x64", "--no-source"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "strategy: decompress-dot" in done.stdout and "@triton.jit" not in done.stdout


def test_explain_a_layer():
    layer = sparsec.SparseLinear(96, 48, spec="fanin(k=8)")
    text = explain(layer, source=False)
    assert "weight 48x96, fp32" in text and "format: ell   strategy: gather" in text


def test_sparsec_explain_takes_a_layer():
    layer = sparsec.SparseLinear(64, 32, spec="2:4", dtype=torch.float16)
    text = sparsec.explain(layer, source=False)
    assert "spec 2:4, weight 32x64, fp16" in text and "format: nm   strategy: decompress-dot" in text


def test_step_flops_counts_the_products_a_step_runs():
    model = nn.Sequential(sparsec.SparseLinear(128, 512, spec="90%"), nn.Linear(512, 10))
    kept = 65536 - 58982  # 128 x 512 at 90%: n - floor(0.9 n)
    assert model[0].layout.nnz == kept
    flops = sparsec.step_flops(model, rows=100)
    assert flops == {"sparse": 3 * 2 * 100 * kept, "dense": 3 * 2 * 100 * 512 * 10, "grow": 2 * 100 * 128 * 512}


def test_explain_shows_each_programs_choice_and_where_it_came_from(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEC_CACHE_DIR", str(tmp_path))
    tuner.forget_choices()
    text = explain_spec("2:4", 64, 128, "fp32", 8, source=False)
    assert "forward      cpp" in text and "no tuning entry" in text
    key = make_layout(parse_spec("2:4"), 64, 128).key
    TuneCache(cpu_device()).store(tuner.tune_key("grad_input", key, torch.float32, 8, "cpp"), {"strategy": "dense"})
    tuner.forget_choices()
    lines = explain_spec("2:4", 64, 128, "fp32", 8, source=False).splitlines()
    choice = {line.split()[0]: line.split()[1:] for line in lines if line.startswith("  grad_")}
    assert choice["grad_input"] == ["dense", "exact", "entry"] and choice["grad_values"] == ["cpp", "default"]
    assert not any("no tuning entry" in line for line in lines)
