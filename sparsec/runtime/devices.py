"""What a tuned choice depends on besides the layer: the device and the toolchain that built its kernels.

A ``Device`` names the hardware (CPU model and vector ISA and core count, or GPU name, compute capability
and SM count) and the toolchain (torch; triton, ptxas and CUDA on a GPU; the C++ compiler on a CPU). The
tuning cache keeps one file per ``Device.identity()``: an entry measured on another machine, or under
another toolchain, is never read.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsec.codegen.cpp import compiler

# the ISA flags -march=native code depends on (the generated CPU kernels are built for them)
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni")


@dataclass(frozen=True)
class Device:
    kind: str  # "cpu" or "cuda"
    name: str  # CPU model or GPU name
    arch: str  # vector ISA flags, or the compute capability ("sm_90")
    units: int  # cores or SMs
    toolchain: tuple[tuple[str, str], ...]  # (tool, version), sorted

    def identity(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "name": self.name,
            "arch": self.arch,
            "units": self.units,
            "toolchain": dict(self.toolchain),
        }

    def slug(self) -> str:
        """A file name for this identity: readable, and unique by its hash."""
        digest = hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]
        return f"{self.kind}-{re.sub(r'[^A-Za-z0-9]+', '-', self.name).strip('-').lower()[:40]}-{digest}"


@functools.cache
def cpu_device() -> Device:
    name, flags = "unknown CPU", set()
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = re.search(r"model name\s*:\s*(.*)", info)
        found = re.search(r"^flags\s*:\s*(.*)$", info, re.M)
        name = model.group(1).strip() if model else name
        flags = set(found.group(1).split()) if found else flags
    except OSError:
        pass
    arch = "+".join(f for f in VECTOR_FLAGS if f in flags) or "unknown"
    tools = {"torch": torch.__version__, "cxx": _compiler_version()}
    return Device("cpu", name, arch, os.cpu_count() or 1, tuple(sorted(tools.items())))


@functools.cache
def cuda_device(index: int) -> Device:
    props = torch.cuda.get_device_properties(index)
    tools = {"torch": torch.__version__, "cuda": str(torch.version.cuda), **_triton_versions()}
    return Device(
        "cuda", props.name, f"sm_{props.major}{props.minor}", props.multi_processor_count, tuple(sorted(tools.items()))
    )


def device_of(t: torch.Tensor) -> Device:
    if t.is_cuda:
        return cuda_device(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return cpu_device()


def _compiler_version() -> str:
    cxx = compiler()
    if cxx is None:
        return "none"
    lines = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout.splitlines()
    return lines[0] if lines else cxx


def _triton_versions() -> dict[str, str]:
    try:
        import triton  # lazy: triton is optional (Linux only) and heavy; only a GPU's identity needs it
    except ImportError:
        return {"triton": "none"}
    versions = {"triton": triton.__version__}
    try:
        from triton.backends.nvidia.compiler import get_ptxas_version  # lazy, as above

        versions["ptxas"] = str(get_ptxas_version())
    except Exception:  # not every triton build ships NVIDIA's backend (or its ptxas)
        versions["ptxas"] = "unknown"
    return versions
