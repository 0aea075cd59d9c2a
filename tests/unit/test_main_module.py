"""``python -m sparsec`` is the ``sparsec`` command line."""

import subprocess
import sys

import pytest


@pytest.mark.slow  # over 2 s
def test_python_m_sparsec_explain_prints_the_format_and_passes():
    done = subprocess.run(
        [sys.executable, "-m", "sparsec", "explain", "2:4", "--shape", "8x16", "--no-source"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "format: nm   strategy: decompress-dot" in done.stdout
    assert "passes: choose_format -> check_constraints -> fuse_epilogue -> tile -> cost_model" in done.stdout


@pytest.mark.slow  # over 2 s
def test_python_m_sparsec_reports_a_bad_spec_with_exit_code_2():
    done = subprocess.run(
        [sys.executable, "-m", "sparsec", "explain", "4:2", "--shape", "8x16"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "N must be smaller than M" in done.stderr
