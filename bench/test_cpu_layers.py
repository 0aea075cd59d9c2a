"""CPU layers side by side, as pytest-benchmark suites: ``pytest bench/ --benchmark-only``.

One group per layer shape, spec, batch and pass (forward under no_grad; forward+backward of ``sum()``),
so nn.Linear (dense), PyTorch's CSR kernels (sparsec's cpu backend), sparsec's generated C++ kernels
(cpp) and SparseProp (Nikdan et al. 2023, when ``sparseprop`` is installed) sit side by side on the
same mask; a grow-step group (RigL's ``|dY^T X|`` selection against a dense GEMM + ``torch.topk``);
the cpp kernels' compile latency. fp32, and bf16 for three layers, at the process's thread count.
Each run is saved as JSON in bench/.benchmarks (``--benchmark-compare`` shows the change against the
last run);
``python bench/render_results.py`` writes the RESULTS.md tables from the newest JSON.
"""

from __future__ import annotations

import ctypes
import functools
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

import sparsec
from sparsec import config
from sparsec.codegen import cpp
from sparsec.codegen.render import render
from sparsec.policies.decision import choose_drops, n_drop_for
from sparsec.runtime.grow import select_growth

try:
    from sparseprop.modules import SparseLinear as SparsePropLinear
except ImportError:  # not a dependency: a column when installed (pip install pybind11 scipy; pip install
    SparsePropLinear = None  # --no-build-isolation sparseprop)

# (out, in, spec, batch): issue 13's rows, then one of each structure at 4096^2
CASES = [
    (3072, 768, "98%", 256),
    (3072, 768, "90%", 256),
    (768, 3072, "fanin(90%)", 1),
    (4096, 4096, "90%", 256),
    (4096, 4096, "99%", 256),
    (4096, 4096, "2:4", 256),
    (4096, 4096, "1:4", 256),
    (4096, 4096, "block(32x32, 90%)", 256),
    (4096, 4096, "fanin(90%)", 256),
]
IMPLS = ["dense", "torch-csr", "sparsec-cpp", "sparseprop"]
BACKEND = {"torch-csr": "cpu", "sparsec-cpp": "cpp"}


def case_name(case) -> str:
    out, inn, spec, batch = case
    return f"{out}x{inn} {spec} batch {batch}"


# bf16 layers (and nn.Linear in bf16): the cpp kernels compute on vdpbf16ps where the CPU has AVX512-BF16
BF16_CASES = [(4096, 4096, "90%", 256), (4096, 4096, "2:4", 256), (3072, 768, "98%", 256)]


@functools.cache
def modules(case, dtype=torch.float32):
    """The sparse layer, the dense nn.Linear of its masked weight, SparseProp's layer of it (fp32 only),
    and an input."""
    out, inn, spec, batch = case
    torch.manual_seed(0)
    layer = sparsec.SparseLinear(inn, out, bias=False, spec=spec, policy=sparsec.static)
    dense = nn.Linear(inn, out, bias=False)
    with torch.no_grad():
        dense.weight.copy_(layer.dense_weight())
    fp32 = dtype == torch.float32
    prop = SparsePropLinear.from_dense(dense) if SparsePropLinear is not None and fp32 else None
    return layer.to(dtype), dense.to(dtype), prop, torch.randn(batch, inn, dtype=dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pass_", ["forward", "forward+backward"])
@pytest.mark.parametrize(
    "case,dtype",
    [(c, torch.float32) for c in CASES] + [(c, torch.bfloat16) for c in BF16_CASES],
    ids=lambda v: case_name(v) if isinstance(v, tuple) else str(v).removeprefix("torch."),
)
def test_layer(benchmark, case, dtype, pass_, impl):
    layer, dense, prop, x = modules(case, dtype)
    module = {"dense": dense, "sparseprop": prop}.get(impl, layer)
    if module is None:
        pytest.skip("sparseprop is not installed" if dtype == torch.float32 else "sparseprop runs fp32 only")
    name = case_name(case) + ("" if dtype == torch.float32 else " bf16")
    benchmark.group = f"{name} {pass_}"
    benchmark.extra_info.update(layer=name, pass_=pass_, impl=impl, threads=torch.get_num_threads())
    if pass_ == "forward":
        inp = x

        def run():
            with torch.no_grad():
                module(inp)
    else:

        def run():  # a new input tensor each step, as training has (nothing kept on the last one applies)
            module(x.clone().requires_grad_()).sum().backward()

    with config.patch(backend=BACKEND.get(impl, config.backend)):
        run()  # warm: index plans, compiled objects
        benchmark(run)


GROW_CASES = [(4096, 4096, "90%", 256), (3072, 768, "98%", 256)]


@pytest.mark.parametrize("impl", ["sparsec-cpp", "dense-gemm+topk"])
@pytest.mark.parametrize("case", GROW_CASES, ids=case_name)
def test_grow_step(benchmark, case, impl):
    """RigL's grow selection from one step's dY and X (30% of the kept weights dropped): sparsec's, in
    chunks of ``config.grow_chunk_bytes``, against ``|dY^T X|`` as one dense GEMM and a ``topk``."""
    out, inn, spec, batch = case
    layer, _, _, x = modules(case)
    dy = torch.randn(batch, out, generator=torch.Generator().manual_seed(1))
    layout, kept = layer.layout, layer.positions()
    dropped = choose_drops(layer.values.detach().abs().reshape(-1), n_drop_for(layout, 0.3))
    benchmark.group = f"grow step {case_name(case)}"
    benchmark.extra_info.update(layer=case_name(case), impl=impl, threads=torch.get_num_threads())

    def sparse_grow():
        return select_growth(layout, kept, dropped, dy, x, regrow_dropped=True).grown()

    def dense_grow():
        scores = (dy.t() @ x).abs_().view(-1)
        still = torch.ones_like(kept, dtype=torch.bool)
        still[dropped] = False
        scores[kept[still]] = -torch.inf  # kept weights stay; just-dropped ones compete (regrow_dropped)
        return scores.topk(dropped.numel()).indices.sort().values

    with config.patch(backend="cpp"), torch.no_grad():
        torch.testing.assert_close(sparse_grow(), dense_grow())  # the same selection (no exact ties here)
        benchmark(sparse_grow if impl == "sparsec-cpp" else dense_grow)


def test_compile_latency(benchmark):
    """A cold build of the fp32 kernels into an empty cache (the figure: the issue's limit is 3 s)."""
    source = render("cpu/rows.cpp.jinja", scalar="float", io="float", index="uint16_t", slot="int32_t")
    benchmark.group = "cpp compile"
    benchmark.extra_info.update(impl="cold build")

    def fresh():
        return (tempfile.mkdtemp(),), {}

    def build(tmp):
        with config.patch(cache_dir=tmp):
            cpp.build(source)
        shutil.rmtree(tmp)

    benchmark.pedantic(build, setup=fresh, rounds=3)


def test_warm_load(benchmark, tmp_path):
    """Loading a cached object afresh: the lookup a warm start does, and the dynamic loader opening a copy
    under a new name (a name it has not opened yet, so it really loads)."""
    source = render("cpu/rows.cpp.jinja", scalar="float", io="float", index="uint16_t", slot="int32_t")
    with config.patch(cache_dir=str(tmp_path)):
        built = cpp.build(source)
        copies = iter(range(10**6))
        benchmark.group = "cpp compile"
        benchmark.extra_info.update(impl="warm load")

        def fresh():
            copy = Path(tmp_path) / f"copy{next(copies)}.so"
            shutil.copy(built, copy)
            return (copy,), {}

        def load(copy):
            cpp.object_path(source).exists()
            ctypes.CDLL(str(copy))

        benchmark.pedantic(load, setup=fresh, rounds=20)
