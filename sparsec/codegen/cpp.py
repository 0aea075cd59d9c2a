"""Generated C++ kernels for the CPU: render, compile with the machine's C++ compiler, load.

As PyTorch Inductor's CPU backend does, a kernel is a plain C++ translation unit (no torch headers),
compiled with the vector flags of the running CPU (``-march=native``) and OpenMP into a shared object
that ``ctypes`` loads. Shapes are arguments, so one object serves every shape of its dtype.

Cache layout: ``<cache_dir>/cpp/v<SCHEMA>/<sha256>.so``, the digest over the source, the compiler's
identity, the flags and the CPU (model and ISA flags: ``-march=native`` code may not run on another
CPU sharing the directory). Invalidated by: any of those, and ``SCHEMA`` when this module changes how
it builds. An object is compiled to a temporary file in the same directory and moved into place with
``os.replace``: processes compiling the same kernel at once each finish with a whole file.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from sparsec import config
from sparsec.errors import SparsecError

SCHEMA = 1
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-fno-math-errno")
_loaded: dict[str, ctypes.CDLL] = {}


@functools.cache
def compiler() -> str | None:
    """The C++ compiler: ``$CXX``, else ``g++``, ``c++`` or ``clang++`` on the PATH; None: none found."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@functools.cache
def _identity() -> str:
    """What the compiled object depends on besides its source: compiler version, flags and CPU."""
    cxx = compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout.splitlines()
    cpu = platform.processor() or platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = re.search(r"model name\s*:\s*(.*)", info)
        isa = re.search(r"^flags\s*:\s*(.*)$", info, re.M)
        cpu = f"{model.group(1) if model else cpu} {isa.group(1) if isa else ''}"
    except OSError:
        pass
    return "\n".join([cxx, version[0] if version else "", " ".join(FLAGS), cpu])


def object_path(source: str) -> Path:
    digest = hashlib.sha256(f"{_identity()}\n{source}".encode()).hexdigest()
    return Path(config.cache_dir) / "cpp" / f"v{SCHEMA}" / f"{digest}.so"


def build(source: str) -> Path:
    """The shared object of ``source``, compiled now unless the cache holds it."""
    cxx = compiler()
    if cxx is None:
        raise SparsecError("no C++ compiler found (set CXX, or install g++): the cpp backend cannot build kernels")
    path = object_path(source)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, src = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".cpp")
    with os.fdopen(fd, "w") as f:
        f.write(source)
    tmp = src[: -len(".cpp")] + ".so"
    try:
        done = subprocess.run([cxx, *FLAGS, src, "-o", tmp], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SparsecError(f"compiling a generated CPU kernel failed ({cxx}):\n{done.stderr[-2000:]}")
        os.replace(tmp, path)
    finally:
        for leftover in (src, tmp):
            if os.path.exists(leftover):
                os.unlink(leftover)
    return path


def load(source: str) -> ctypes.CDLL:
    """The loaded object of ``source`` (built on first use; memoised per process)."""
    digest = hashlib.sha256(source.encode()).hexdigest()
    if digest not in _loaded:
        _loaded[digest] = ctypes.CDLL(str(build(source)))
    return _loaded[digest]
