"""Typed settings: every ``SPARSEC_*`` environment variable has its one home here.

``config.grow_chunk_bytes`` reads the environment each time, so a test can set it with
``config.patch(grow_chunk_bytes=...)`` or ``monkeypatch.setenv``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

from sparsec.errors import SparsecError


@dataclass(frozen=True)
class _Setting:
    env: str
    default: int
    doc: str

    def read(self) -> int:
        raw = os.environ.get(self.env)
        if raw is None:
            return self.default
        try:
            value = int(raw)
        except ValueError:
            raise SparsecError(
                f"{self.env}={raw!r} is not an integer; set it to a byte count such as 4194304"
            ) from None
        if value < 1:
            raise SparsecError(f"{self.env}={value} must be at least 1 byte")
        return value


SETTINGS: dict[str, _Setting] = {
    "grow_chunk_bytes": _Setting(
        "SPARSEC_GROW_CHUNK_BYTES",
        16 * 2**20,
        "bytes of dense gradient scores one chunk of output rows may hold during a grow step",
    ),
}

_overrides: dict[str, int] = {}


def __getattr__(name: str) -> int:
    if name in _overrides:
        return _overrides[name]
    if name in SETTINGS:
        return SETTINGS[name].read()
    raise AttributeError(f"sparsec.config has no setting {name!r}; known: {sorted(SETTINGS)}")


@contextlib.contextmanager
def patch(**values: int) -> Iterator[None]:
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
