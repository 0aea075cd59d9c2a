"""pytest-benchmark settings of the bench/ suites: every run is saved as JSON under bench/.benchmarks (so
``--benchmark-compare`` sees the last run), and the JSON carries the machine line and the command that
``render_results.py`` prints with its tables."""

from __future__ import annotations

import datetime
import shlex
import sys
from pathlib import Path

import pytest
from pytest_benchmark.utils import get_tag
from results import machine

STORAGE = Path(__file__).with_name(".benchmarks")
DEFAULT_STORAGE = "file://./.benchmarks"  # pytest-benchmark's own default (relative to the working directory)


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark's own pytest_configure reads the options
def pytest_configure(config):
    opt = config.option
    if getattr(opt, "benchmark_storage", None) == DEFAULT_STORAGE:
        opt.benchmark_storage = f"file://{STORAGE}"
    if hasattr(opt, "benchmark_autosave") and not (opt.benchmark_save or opt.benchmark_autosave):
        opt.benchmark_autosave = get_tag()  # what --benchmark-autosave stores: commit and time


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["sparsec"] = {
        "machine": machine(),
        "command": shlex.join(["pytest", *sys.argv[1:]]),
        "date": datetime.date.today().isoformat(),
    }
