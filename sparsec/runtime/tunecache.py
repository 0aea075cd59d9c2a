"""The persistent tuning cache: one JSON file per device and toolchain, entries per layer program.

Layout: ``<SPARSEC_CACHE_DIR>/tuning/v<SCHEMA>/<Device.slug()>.json`` holding ``{"schema", "device",
"entries": {TuneKey.text(): entry}}``. Writes hold a file lock (``filelock``), re-read the file, merge
and replace it atomically (``os.replace``): two processes storing at once leave one valid file holding
both. A file that is corrupt, truncated, of another schema or of another device is ignored with one
warning and rewritten by the next store. JSON only: nothing is unpickled.

What invalidates an entry (each is in its key or its file's identity):

- the file (``Device.identity``): device kind and name; vector ISA or compute capability; core or SM count;
  torch, triton, ptxas, CUDA and C++ compiler versions; ``SCHEMA``;
- the entry (``TuneKey``): the program (forward, grad_input, grad_values); the structure (the layout's
  family, e.g. ``2:4``, ``block(32x32)``); its density bucket; the dtype; the exact weight shape; the batch
  bucket (powers of two); the hash of the generated source the candidates run (a template change).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import warnings
from pathlib import Path

import filelock

from sparsec import config
from sparsec.errors import SparsecError, SparsecWarning
from sparsec.runtime.devices import Device

SCHEMA = 1


class TuningWarning(SparsecWarning):
    """A tuning cache could not be used as it is, or a kernel runs untuned."""


def batch_bucket(batch: int) -> int:
    """The power of two at or above ``batch`` (1 for an empty batch)."""
    return 1 << max(0, int(batch) - 1).bit_length()


def density_bucket(density: float) -> str:
    """Half-octave buckets of the kept fraction: ``2^-6.5`` holds 0.9% to 1.3%."""
    if not 0 < density <= 1:
        return "empty" if density == 0 else "invalid"
    return f"2^{-round(-math.log2(density) * 2) / 2:g}"


@dataclasses.dataclass(frozen=True)
class TuneKey:
    program: str  # forward, grad_input, grad_values
    family: str  # the layout's structure without its count (Layout.op_key.family)
    density: str  # density_bucket
    dtype: str  # sparsec's dtype name
    out_features: int
    in_features: int
    batch: int  # batch_bucket
    source: str  # hash of the generated source the candidates run

    def text(self) -> str:
        return "|".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items())

    @staticmethod
    def parse(text: str) -> TuneKey:
        fields = dict(part.split("=", 1) for part in text.split("|"))
        for name in ("out_features", "in_features", "batch"):
            fields[name] = int(fields[name])
        return TuneKey(**fields)


class TuneCache:
    """The tuning entries of one device (its file under ``root``, default ``SPARSEC_CACHE_DIR``)."""

    def __init__(self, device: Device, root: str | os.PathLike | None = None):
        self.device = device
        base = Path(root if root is not None else config.cache_dir)
        self.path = base / "tuning" / f"v{SCHEMA}" / f"{device.slug()}.json"
        self._warned: set[str] = set()

    # --- reading ---------------------------------------------------------------------------------

    def entries(self) -> dict[str, dict]:
        """Every valid entry (an unusable file reads as none, with one warning)."""
        return self._read(self.path, warn=True)

    def get(self, key: TuneKey) -> dict | None:
        return self.entries().get(key.text())

    def nearest(self, key: TuneKey, entries: dict[str, dict] | None = None) -> dict | None:
        """The entry of the same layer and program at the nearest batch bucket (the smaller on a tie)."""
        best = None
        for text, entry in (self.entries() if entries is None else entries).items():
            other = _parse(text)
            if other is None or other.batch == key.batch or dataclasses.replace(other, batch=key.batch) != key:
                continue
            distance = (abs(math.log2(other.batch) - math.log2(key.batch)), other.batch)
            if best is None or distance < best[0]:
                best = (distance, entry)
        return None if best is None else best[1]

    def lookup(self, key: TuneKey) -> tuple[dict | None, str]:
        """(entry, where from): the exact entry, else the nearest batch bucket's, else (None, "none"); one read."""
        entries = self.entries()
        if key.text() in entries:
            return entries[key.text()], "exact entry"
        entry = self.nearest(key, entries)
        return (entry, "nearest batch bucket") if entry is not None else (None, "none")

    # --- writing ---------------------------------------------------------------------------------

    def store(self, key: TuneKey, entry: dict) -> None:
        self.merge({key.text(): entry})

    def merge(self, entries: dict[str, dict]) -> None:
        """Add ``entries`` under the file lock: re-read, merge, replace atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with filelock.FileLock(str(self.path) + ".lock"):
            merged = {**self._read(self.path, warn=False), **entries}
            document = {"schema": SCHEMA, "device": self.device.identity(), "entries": merged}
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tmp-", suffix=".json")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(document, f, indent=1, sort_keys=True)
                os.replace(tmp, self.path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)

    def export(self, dest: str | os.PathLike) -> int:
        """Write this device's entries to ``dest``; returns how many."""
        entries = self.entries()
        document = {"schema": SCHEMA, "device": self.device.identity(), "entries": entries}
        Path(dest).write_text(json.dumps(document, indent=1, sort_keys=True))
        return len(entries)

    def import_(self, src: str | os.PathLike) -> int:
        """Merge the entries of an exported file of this very device and toolchain; refuses any other."""
        try:
            document = json.loads(Path(src).read_text())
        except (OSError, ValueError) as e:
            raise SparsecError(f"{src}: not a sparsec tuning export ({e})") from None
        problem = self._problem(document)
        if problem is not None:
            raise SparsecError(f"{src}: {problem}; tune on this machine instead (sparsec tune)")
        self.merge(document["entries"])
        return len(document["entries"])

    # --- the file ----------------------------------------------------------------------------------

    def _problem(self, document) -> str | None:
        if not isinstance(document, dict) or document.get("schema") != SCHEMA:
            found = document.get("schema") if isinstance(document, dict) else None
            return f"schema {found!r}, this sparsec reads schema {SCHEMA}"
        if document.get("device") != self.device.identity():
            return f"tuned for {document.get('device')}, not this device {self.device.identity()}"
        if not isinstance(document.get("entries"), dict):
            return "no entries table"
        return None

    def _read(self, path: Path, warn: bool) -> dict[str, dict]:
        try:
            text = path.read_text()
        except FileNotFoundError:
            return {}
        try:
            document = json.loads(text)
        except ValueError as e:
            problem = f"corrupt or truncated ({e})"
        else:
            problem = self._problem(document)
        if problem is None:
            return {k: v for k, v in document["entries"].items() if _parse(k) is not None and isinstance(v, dict)}
        if warn and problem not in self._warned:
            self._warned.add(problem)
            warnings.warn(
                f"tuning cache {path} is ignored: {problem}; the next tuning run rewrites it",
                TuningWarning,
                stacklevel=3,
            )
        return {}


def _parse(text: str) -> TuneKey | None:
    try:
        return TuneKey.parse(text)
    except (ValueError, TypeError):
        return None
