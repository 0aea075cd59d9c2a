"""Typed settings: every ``SPARSEC_*`` environment variable has its one home here.

Settings are read from the environment each time they are used, so ``config.patch(...)`` (tests,
experiments) and ``monkeypatch.setenv`` both work. A bad value is an error naming the variable,
the value and what it takes. README's settings table lists the same entries.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import platformdirs

from sparsec.errors import SparsecError


def _positive_int(env: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise SparsecError(f"{env}={raw!r} is not an integer; set it to a byte count such as 4194304") from None
    if value < 1:
        raise SparsecError(f"{env}={value} must be at least 1")
    return value


def _flag(env: str, raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off", ""):
        return False
    raise SparsecError(f"{env}={raw!r} is not a flag; set it to 1 or 0")


BACKENDS = ("auto", "triton", "interpret", "cpu", "cpp")


def _backend(env: str, raw: str) -> str:
    if raw not in BACKENDS:
        raise SparsecError(f"{env}={raw!r} is not a backend; choose one of {', '.join(BACKENDS)}")
    return raw


def _path(env: str, raw: str) -> str:
    return os.path.expanduser(raw)


@dataclass(frozen=True)
class _Setting:
    env: str
    default: Callable[[], Any]
    parse: Callable[[str, str], Any]
    doc: str

    def read(self) -> Any:
        raw = os.environ.get(self.env)
        return self.default() if raw is None else self.parse(self.env, raw)


SETTINGS: dict[str, _Setting] = {
    "grow_chunk_bytes": _Setting(
        "SPARSEC_GROW_CHUNK_BYTES",
        lambda: 16 * 2**20,
        _positive_int,
        "working memory one chunk of output rows may use while a grow step scores |dY^T X|",
    ),
    "verify": _Setting(
        "SPARSEC_VERIFY", lambda: False, _flag, "run the IR verifier between every pass of the lowering pipeline"
    ),
    "backend": _Setting(
        "SPARSEC_BACKEND",
        lambda: "auto",
        _backend,
        "where sparse layers run: auto (triton on CUDA tensors, else cpp), triton, interpret (Triton's "
        "interpreter on CPU, needs TRITON_INTERPRET=1), cpu (PyTorch's CSR kernels), cpp (generated C++ kernels "
        "on CPU tensors, compiled on first use)",
    ),
    "cpp_keep_tiles": _Setting(
        "SPARSEC_CPP_KEEP_TILES",
        lambda: True,
        _flag,
        "eager training on the cpp backend hands each sparse layer's batch-tile copy of its input, made by the "
        "forward, to the same step's gradient dots (one more copy of the input per layer until its backward)",
    ),
    "autotune": _Setting(
        "SPARSEC_AUTOTUNE",
        lambda: False,
        _flag,
        "under SPARSEC_BACKEND=auto, tune a layer program the first time it runs without a tuning entry for "
        "its device (else the backend's default strategy runs; `sparsec tune` tunes ahead of time)",
    ),
    "cache_dir": _Setting(
        "SPARSEC_CACHE_DIR",
        lambda: platformdirs.user_cache_dir("sparsec"),
        _path,
        "root of sparsec's caches (generated kernel source, compiled CPU kernels); default: the platform's user "
        "cache dir",
    ),
}

_overrides: dict[str, Any] = {}


def __getattr__(name: str) -> Any:
    if name in _overrides:
        return _overrides[name]
    if name in SETTINGS:
        return SETTINGS[name].read()
    raise AttributeError(f"sparsec.config has no setting {name!r}; known: {sorted(SETTINGS)}")


def raw(name: str) -> object:
    """A setting's override or its unparsed environment value (None: neither): a cheap memo key for code on
    every call (``cache_dir``'s default alone costs microseconds to compute)."""
    if name in _overrides:
        return _overrides[name]
    return os.environ.get(SETTINGS[name].env)


@contextlib.contextmanager
def patch(**values: Any) -> Iterator[None]:
    """Override settings inside a ``with`` block (tests, experiments)."""
    unknown = set(values) - set(SETTINGS)
    if unknown:
        raise SparsecError(f"unknown setting(s) {sorted(unknown)}; known: {sorted(SETTINGS)}")
    saved = dict(_overrides)
    _overrides.update(values)
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)
