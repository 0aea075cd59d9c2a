"""The kernel source cache: content-addressed files under ``SPARSEC_CACHE_DIR``, imported from there.

Triton reads a kernel's source through ``inspect``, so generated code must live in a real file
with ``__file__`` set. A file is named by the sha256 of its source, written to a temporary file
and moved into place with ``os.replace`` (atomic: concurrent processes never see half a file).
Cache layout: ``<cache_dir>/kernels/v<SCHEMA>/<sha256>.py``. Invalidated by: the source text
itself (it is the key), and ``SCHEMA`` when this loader changes how it uses the files.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path
from types import ModuleType

from sparsec import config

SCHEMA = 1
_loaded: dict[tuple[str, bool], ModuleType] = {}


def source_path(source: str) -> Path:
    digest = hashlib.sha256(source.encode()).hexdigest()
    return Path(config.cache_dir) / "kernels" / f"v{SCHEMA}" / f"{digest}.py"


def write_source(source: str) -> Path:
    path = source_path(source)
    if path.exists() and path.read_text() == source:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".py")
    with os.fdopen(fd, "w") as f:
        f.write(source)
    os.replace(tmp, path)
    return path


def interpreting() -> bool:
    """Whether this process runs Triton's interpreter: ``TRITON_INTERPRET=1`` set before triton's import
    (triton.language's own jit functions are decorated once, at that import)."""
    import triton  # lazy: triton is optional (Linux only) and heavy; nothing here needs it before a kernel runs

    return bool(triton.knobs.runtime.interpret)


def load_kernel_module(source: str) -> ModuleType:
    """Import generated source from its cache file (memoised per source and interpreter mode)."""
    digest = hashlib.sha256(source.encode()).hexdigest()
    key = (digest, interpreting())
    if key not in _loaded:
        path = write_source(source)
        spec = importlib.util.spec_from_file_location(f"sparsec_kernel_{digest[:16]}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _loaded[key] = module
    return _loaded[key]
