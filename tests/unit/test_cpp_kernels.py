"""The cpp backend's generated C++ kernels against float64 dense references, on odd shapes and batches
(one batch row, a partial batch tile, several tiles), for every structure; and training through them."""

import pytest
import torch
from helpers import SPECS_AND_SHAPES
from torch import nn

import sparsec
from sparsec import config
from sparsec.codegen.cpp import compiler
from sparsec.runtime import plans

needs_compiler = pytest.mark.skipif(compiler() is None, reason="no C++ compiler on this machine")


def _case(spec, out, inn, batch, dtype):
    torch.manual_seed(out * inn + batch)
    layer = sparsec.SparseLinear(inn, out, spec=spec, dtype=dtype)
    with torch.no_grad():
        layer.values.normal_()  # values of both signs and full range, not the init's small ones
        layer.bias.normal_()
    x = torch.randn(batch, inn, dtype=dtype, requires_grad=True)
    return layer, x


@needs_compiler
@pytest.mark.parametrize("batch", [0, 1, 8, 13, 70])  # empty, one row, one vector, partial and several tiles
@pytest.mark.parametrize("spec,out,inn", SPECS_AND_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.float64, marks=pytest.mark.slow)])
def test_forward_and_both_gradients_match_the_dense_float64_reference(spec, out, inn, batch, dtype):
    layer, x = _case(spec, out, inn, batch, dtype)
    dy = torch.randn(batch, out, dtype=dtype)
    with config.patch(backend="cpp"):
        y = layer(x)
        y.backward(dy)
    w = layer.dense_weight().double()
    x64, dy64 = x.detach().double(), dy.double()
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(y.double(), x64 @ w.T + layer.bias.detach().double(), **tol)
    torch.testing.assert_close(x.grad.double(), dy64 @ w, **tol)
    expected = layer.layout.values_from_dense((dy64.T @ x64).view(layer.weight_shape), layer.positions())
    torch.testing.assert_close(layer.values.grad.double(), expected, **tol)
    assert batch == 0 or (layer.values.grad.abs().sum() > 0 and y.abs().sum() > 0)  # the case computes something


@needs_compiler
@pytest.mark.parametrize("width", [torch.uint16, torch.int32])  # 32-bit: columns past 65536, forced here
@pytest.mark.parametrize("batch", [1, 3, 70, 128])  # gather path, batch tiles; 128: padded dots
@pytest.mark.parametrize(  # 99%: the gradient dots row by row; the denser ones: in blocks of rows and columns
    "spec,out,inn", [("fanin(90%)", 29, 301), ("95%", 23, 517), ("99%", 67, 2100), ("2:4", 9, 36)]
)
@pytest.mark.parametrize("walk", ["rows", "columns"])  # dy @ W: a scatter through W's rows, or W^T's rows
def test_both_index_widths_and_long_rows_match_the_reference(spec, out, inn, batch, width, walk, monkeypatch):
    from sparsec.runtime import cpp

    monkeypatch.setattr(cpp, "_index_dtype", lambda extent: width)
    slots = torch.int32 if width == torch.uint16 else torch.int64  # 64-bit slots: past 2^31 values, forced
    monkeypatch.setattr(cpp, "_slot_dtype", lambda n: slots)
    chosen = cpp.scatters_grad_input
    monkeypatch.setattr(cpp, "scatters_grad_input", lambda plan, b, dtype, _=None: chosen(plan, b, dtype, walk))
    layer, x = _case(spec, out, inn, batch, torch.float32)
    dy = torch.randn(batch, out)
    with config.patch(backend="cpp"):
        y = layer(x)
        y.backward(dy)
    plan = plans.held_plan(list(layer.index_buffers().values()), "cpp")
    assert plan.cols.dtype == width
    if walk == "rows" or batch < cpp._tiling("float")[1]:  # scattered through W's rows (always under one vector)
        assert plan.cols_t is None
    else:
        assert plan.cols_t.dtype == width and plan.order_t.dtype == slots
    w = layer.dense_weight().double()
    x64, dy64 = x.detach().double(), dy.double()
    tol = {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(y.double(), x64 @ w.T + layer.bias.detach().double(), **tol)
    torch.testing.assert_close(x.grad.double(), dy64 @ w, **tol)
    expected = layer.layout.values_from_dense((dy64.T @ x64).view(layer.weight_shape), layer.positions())
    torch.testing.assert_close(layer.values.grad.double(), expected, **tol)


@needs_compiler
@pytest.mark.parametrize(  # (spec, out, inn, batch) -> whether dy @ W scatters through W's rows
    "spec,out,inn,batch,scatters",
    [
        ("2:4", 64, 64, 256, True),  # half dense: at any batch
        ("75%", 64, 64, 200, True),  # 25% dense: the rule's bound
        ("90%", 64, 64, 64, True),  # one tile, a gradient no wider than dy
        ("90%", 64, 64, 65, False),  # two tiles
        ("90%", 40, 300, 64, False),  # one tile, a gradient wider than dy
        ("block(4x4, 50%)", 64, 64, 64, False),  # blocks walk their own micro-tiles' W^T
    ],
)
def test_the_rule_scatters_dense_layers_and_one_tile_of_a_no_wider_gradient(spec, out, inn, batch, scatters):
    from sparsec.runtime import cpp

    assert cpp._tiling("float")[0] == 64  # the rule's cases assume this CPU's 64-row tiles (AVX-512)
    layer = sparsec.SparseLinear(inn, out, spec=spec)
    with config.patch(backend="cpp"), torch.no_grad():
        layer(torch.randn(2, inn))
    plan = plans.held_plan(list(layer.index_buffers().values()), "cpp")
    assert cpp.scatters_grad_input(plan, batch, torch.float32) == scatters
    assert cpp.scatters_grad_input(plan, batch, torch.float32, "columns") is False
    assert cpp.scatters_grad_input(plan, batch, torch.float32, "rows") == (plan.block is None)


@needs_compiler
@pytest.mark.parametrize("threads", [2, 3, 5])  # more threads than columns: some own none
@pytest.mark.parametrize("out,inn,spec", [(1, 1, "dense"), (3, 1, "dense"), (1, 3, "dense"), (7, 2, "50%")])
def test_the_scatter_on_tiny_layers_and_more_threads_than_columns_matches(out, inn, spec, threads):
    from sparsec.runtime import cpp

    torch.manual_seed(threads)
    if spec == "dense":  # every position kept: one value per weight
        layer = sparsec.SparseLinear(inn, out, spec="0%")
    else:
        layer = sparsec.SparseLinear(inn, out, spec=spec)
    with config.patch(backend="cpp"), torch.no_grad():
        layer(torch.randn(2, inn))
    plan = plans.held_plan(list(layer.index_buffers().values()), "cpp")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for batch in (64, 65, 128):  # one tile, one row past it, two whole tiles
            dy = torch.randn(batch, out)
            got = cpp.cpp_grad_input(plan, dy, layer.values.detach(), walk="rows")
            torch.testing.assert_close(got.double(), dy.double() @ layer.dense_weight().double(), rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(before)


@needs_compiler
@pytest.mark.slow  # 4.2M kept weights: past the size where grad_input's permutation runs in bands of sources
def test_a_layer_past_the_banded_permutation_size_matches_the_reference():
    layer, x = _case("2:4", 2049, 4100, 70, torch.float32)
    assert layer.values.numel() * 4 >= 16 << 20  # kernels/cpu/rows.cpp.jinja: PERMUTE_BANDED_BYTES
    dy = torch.randn(70, 2049)
    with config.patch(backend="cpp"):
        layer(x).backward(dy)
    w = layer.dense_weight().double()
    torch.testing.assert_close(x.grad.double(), dy.double() @ w, rtol=1e-4, atol=1e-4)


@needs_compiler
@pytest.mark.parametrize("batch", [1, 5, 70])
@pytest.mark.parametrize("spec,out,inn", [("fanin(90%)", 29, 301), ("block(4x8, 50%)", 36, 48), ("1:8", 21, 40)])
def test_inference_calls_run_the_kernels_without_the_op_and_match(spec, out, inn, batch, monkeypatch):
    from sparsec.runtime import ops

    layer, x = _case(spec, out, inn, batch, torch.float32)
    calls = []
    eager, op = ops.spmm_eager, torch.ops.sparsec.spmm
    monkeypatch.setattr(ops, "spmm_eager", lambda *a, **k: calls.append("kernels") or eager(*a, **k))
    monkeypatch.setattr(torch.ops.sparsec, "spmm", lambda *a: calls.append("op") or op(*a))
    with config.patch(backend="cpp"), torch.no_grad():
        y = layer(x)
    assert calls == ["kernels"]  # the layer called the kernels itself, not through torch.ops.sparsec.spmm
    w = layer.dense_weight().double()
    torch.testing.assert_close(y.double(), x.detach().double() @ w.T + layer.bias.double(), rtol=1e-4, atol=1e-4)
    with config.patch(backend="cpp"):
        y = layer(x)  # training: the eager autograd Function, not the op
    assert type(y.grad_fn).__name__ == "_EagerTrainingBackward" and calls == ["kernels"]
    with config.patch(backend="cpu"):
        y = layer(x)  # training on another backend: through the op
    assert calls == ["kernels", "op", "kernels"]


def test_eager_calls_are_refused_where_something_traces_or_watches_them():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.overrides import TorchFunctionMode

    from sparsec.runtime.ops import eager_call_allowed, records_graph

    x, w = torch.randn(2, 3), nn.Parameter(torch.randn(3))
    assert eager_call_allowed(x, w, None) and eager_call_allowed(x, w.detach(), None)
    assert records_graph(x, w, None) and not records_graph(x, w.detach(), None)
    with torch.no_grad():
        assert not records_graph(x, w, None)
    with FakeTensorMode() as mode:
        assert not eager_call_allowed(mode.from_tensor(x), None)  # a subclass, and a dispatch mode

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Watch():
        assert not eager_call_allowed(x)  # a TorchFunctionMode must see torch.ops.sparsec.spmm
    seen = []

    @torch.compile(backend="eager", fullgraph=True)
    def traced(t):
        seen.append(eager_call_allowed(t))
        return t + 1

    traced(x)
    assert seen == [False]
    with torch.no_grad():
        torch.vmap(lambda t: seen.append(eager_call_allowed(t)) or t)(x)  # vmap's batched tensors look plain
        torch.func.grad(lambda t: seen.append(eager_call_allowed(t)) or t.sum())(x)
    assert seen == [False, False, False]


@needs_compiler
def test_half_inputs_compute_in_float32():
    layer, x = _case("90%", 21, 40, 9, torch.float32)
    with config.patch(backend="cpp"):
        y = layer.to(torch.bfloat16)(x.detach().to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    w = layer.dense_weight().float()
    torch.testing.assert_close(
        y.float(), x.detach().to(torch.bfloat16).float() @ w.T + layer.bias.float(), rtol=2e-2, atol=2e-2
    )


@needs_compiler
@pytest.mark.parametrize("batch", [1, 13, 70])  # the gather path, one partial tile, two tiles
@pytest.mark.parametrize(
    "spec,out,inn", [("90%", 37, 53), ("2:4", 37, 52), ("block(4x8, 50%)", 36, 48), ("fanin(k=9)", 23, 41)]
)
@pytest.mark.parametrize("walk", ["rows", "columns"])  # dy @ W: W's rows scattered (bf16 tiles widened), or W^T's
def test_bfloat16_tensors_go_to_the_kernels_and_round_as_torch_does(spec, out, inn, batch, walk):
    """bf16 tensors go to the kernels as they are. Where the kernels compute in fp32 (the gather path of
    small batches; every path on a CPU without AVX512-BF16) the result is bit for bit what widening the
    inputs, the fp32 kernels and ``.to(torch.bfloat16)`` give (a rounding or widening slip changes some
    bits); where they sum bf16 products on vdpbf16ps, it is the float64 reference to bf16 precision."""
    from sparsec.runtime import cpp

    layer, x = _case(spec, out, inn, batch, torch.float32)
    layer = layer.to(torch.bfloat16)
    xb, dy = x.detach().to(torch.bfloat16), torch.randn(batch, out).to(torch.bfloat16)
    v, bias = layer.values.detach(), layer.bias.detach()
    with config.patch(backend="cpp"):
        layer(xb)  # builds the layer's plan
    plan = plans.held_plan(list(layer.index_buffers().values()), "cpp")
    bf, f32 = torch.bfloat16, torch.float32
    got = [
        cpp.cpp_forward(plan, xb, v, bias),
        cpp.cpp_grad_input(plan, dy, v, walk=walk),
        cpp.cpp_grad_values(plan, dy, xb, v),
    ]
    w = layer.dense_weight().double()
    full = (dy.double().T @ xb.double()).view(layer.weight_shape)
    expected = [
        xb.double() @ w.T + bias.double(),
        dy.double() @ w,
        layer.layout.values_from_dense(full, layer.positions()),
    ]
    for a, e in zip(got, expected, strict=True):
        assert a.dtype == bf and a.abs().sum() > 0
        torch.testing.assert_close(a.double(), e, rtol=2e-2, atol=2e-2)
    bf16_dots = cpp._library("float", "bf16", "uint16_t", "int32_t").sparsec_work_bytes() == 2
    assert bf16_dots == ("avx512_bf16" in open("/proc/cpuinfo").read())  # used where the CPU has it
    if batch < cpp._tiling("float")[1] or not bf16_dots:  # fp32 arithmetic throughout
        widened = [
            cpp.cpp_forward(plan, xb.to(f32), v.to(f32), bias.to(f32)).to(bf),
            cpp.cpp_grad_input(plan, dy.to(f32), v.to(f32), walk=walk).to(bf),
        ]
        for a, b in zip(got[:2], widened, strict=True):
            assert torch.equal(a, b)


def _train(backend: str):
    torch.manual_seed(0)
    model = sparsec.sparsify(
        nn.Sequential(nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 10)), spec="75%", policy=sparsec.rigl(delta_t=2)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    updater = sparsec.MaskUpdater(model, opt, total_steps=20)
    moved = 0
    with config.patch(backend=backend):
        for t in range(10):
            g = torch.Generator().manual_seed(t)
            x, y = torch.randn(32, 24, generator=g), torch.randint(0, 10, (32,), generator=g)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            moved += sum(updater.step().values())
            opt.zero_grad()
    return moved, [m.mask() for m in updater.layers.values()], [p.detach().clone() for p in model.parameters()]


@needs_compiler
@pytest.mark.parametrize("walk", ["rows", "columns"])  # columns: W^T built, gone stale at each update, rebuilt
def test_rigl_training_on_the_cpp_backend_follows_the_cpu_backend(walk, monkeypatch):
    from sparsec.runtime import cpp

    rule = cpp.scatters_grad_input
    monkeypatch.setattr(cpp, "scatters_grad_input", lambda plan, b, dtype, _=None: rule(plan, b, dtype, walk))
    moved, masks, params = _train("cpp")
    ref_moved, ref_masks, ref_params = _train("cpu")
    assert moved > 0 and moved == ref_moved
    for a, b in zip(masks, ref_masks, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(params, ref_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


BUILD = """
import sys
from sparsec import config
from sparsec.codegen import cpp
from sparsec.codegen.render import render
with config.patch(cache_dir=sys.argv[1]):
    lib = cpp.load(render("cpu/rows.cpp.jinja", scalar="float", io="float", index="int32_t", slot="int32_t"))
    print(lib.sparsec_batch_tile())
"""


@needs_compiler
@pytest.mark.slow  # two interpreters importing torch
def test_two_processes_compiling_the_same_kernel_at_once_both_succeed(tmp_path):
    import subprocess
    import sys

    procs = [
        subprocess.Popen([sys.executable, "-c", BUILD, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err.decode()[-500:] for _, err in outs]
    assert len({out for out, _ in outs}) == 1 and int(outs[0][0]) > 0
    built = list((tmp_path / "cpp").rglob("*"))
    assert [p.suffix for p in built if p.is_file()] == [".so"]  # one object, no temporary left behind


@needs_compiler
def test_the_cache_key_holds_the_compiler_flags_and_cpu(monkeypatch):
    from sparsec.codegen import cpp

    source = "// a kernel"
    before = cpp.object_path(source)
    monkeypatch.setattr(cpp, "FLAGS", (*cpp.FLAGS, "-DANOTHER"))
    cpp._identity.cache_clear()
    try:
        assert cpp.object_path(source) != before
    finally:
        monkeypatch.undo()
        cpp._identity.cache_clear()
    assert cpp.object_path(source) == before and cpp.object_path(source + " ") != before


@pytest.mark.parametrize("backend", ["cpp", "auto"])
def test_without_a_compiler_the_cpu_backend_runs_with_one_warning(backend, monkeypatch):
    from sparsec.runtime import ops

    monkeypatch.setattr(ops, "cpp_problem", lambda: "no C++ compiler found: set CXX or install g++")
    ops._warn_cpu_fallback.cache_clear()
    layer, x = _case("90%", 21, 40, 5, torch.float32)
    with config.patch(backend=backend):
        with pytest.warns(sparsec.SparsecWarning, match="cannot run here [(]no C[+][+] compiler found.* cpu backend"):
            y = layer(x)
        y2 = layer(x)  # no second warning (SparsecWarning is an error in this suite)
    with config.patch(backend="cpu"):
        torch.testing.assert_close(y, layer(x))
    torch.testing.assert_close(y, y2)
    ops._warn_cpu_fallback.cache_clear()


@needs_compiler
def test_auto_runs_the_generated_kernels_on_cpu_tensors():
    from sparsec.runtime import ops

    assert ops.backend_for(torch.zeros(1)) == "cpp"
    with config.patch(backend="cpu"):
        assert ops.backend_for(torch.zeros(1)) == "cpu"


ASAN_RUN = """
import sys
import torch
import sparsec
from sparsec import config
from sparsec.codegen import cpp

from sparsec.runtime import cpp as kernels

cpp.FLAGS = (*cpp.FLAGS, "-fsanitize=address", "-fno-omit-frame-pointer")
cpp._identity.cache_clear()
rule = kernels.scatters_grad_input
for dtype, walk in [(d, w) for d in (torch.float32, torch.float64, torch.bfloat16) for w in ("rows", "columns")]:
    kernels.scatters_grad_input = lambda plan, b, dt, _=None: rule(plan, b, dt, walk)  # dy @ W: both walks
    specs = [("90%", 37, 53), ("2:4", 8, 16), ("block(3x5, 75%)", 21, 35), ("fanin(k=5)", 37, 53), ("99%", 9, 2100)]
    for spec, out, inn in specs:  # 99%: the gradient dots on the kept tiles
        for batch in (0, 1, 7, 8, 33, 70, 128):  # 128: the padded leading dimension of the dots
            layer = sparsec.SparseLinear(inn, out, spec=spec, dtype=dtype)
            x = torch.randn(batch, inn, dtype=dtype, requires_grad=True)
            with config.patch(backend="cpp"):
                layer(x).sum().backward()
            with torch.no_grad(), config.patch(backend="cpp"):
                layer(x)  # the direct call under no_grad
from sparsec.runtime.cpp import cpp_best_in_row
for n, k, floor in [(0, 3, 0.0), (1, 1, -1.0), (9, 20, 0.3), (1001, 500, 0.1), (70001, 69999, -1.0)]:
    s = (torch.randint(0, 9, (n,)).float() / 9).contiguous()
    cpp_best_in_row(s, k, floor)
from sparsec.runtime.cpp import cpp_grow_per_unit
for b, o, i, w in [(1, 1, 1, 1), (3, 7, 5, 5), (9, 13, 70, 70), (64, 7, 33, 33), (9, 13, 72, 4), (5, 8, 24, 8)]:
    dy, x = torch.randn(b, o), torch.randn(b, i)  # rows past a tile's 6, columns past its 32; N:M groups
    listed = torch.randperm(o * i)[: o * i // 3].sort().values
    cpp_grow_per_unit(dy, x, listed, torch.randint(0, w + 2, (o * (i // w),)), w)
from sparsec.runtime.cpp import cpp_best_per_row
for rows, cols in [(1, 1), (5, 3), (33, 257)]:
    s = torch.randint(0, 4, (rows, cols)).float()
    cpp_best_per_row(s, torch.randint(0, cols + 2, (rows,)))
print("clean")
"""


@needs_compiler
@pytest.mark.slow  # a sanitised build and run in a subprocess
def test_the_kernels_run_clean_under_address_sanitizer(tmp_path):
    """Every out-of-bounds read or write of the generated kernels (odd shapes, empty and partial batches)
    aborts an AddressSanitizer build; the run must finish clean."""
    import os
    import subprocess
    import sys

    cxx = compiler()
    libs = [
        subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        for name in ("libasan.so", "libstdc++.so.6")  # libstdc++ first too: triton's import throws C++ exceptions
    ]
    if not all(os.path.isabs(lib) and os.path.exists(lib) for lib in libs):
        pytest.skip(f"{cxx} has no AddressSanitizer runtime here")
    env = {
        **os.environ,
        "LD_PRELOAD": " ".join(libs),
        "ASAN_OPTIONS": "detect_leaks=0",
        "SPARSEC_CACHE_DIR": str(tmp_path),
    }
    done = subprocess.run([sys.executable, "-c", ASAN_RUN], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0 and "clean" in done.stdout, done.stderr[-3000:]


def _best_by_sorting(scores: list[float], k: int, floor: float) -> list[int]:
    """The k largest above floor (no NaN), ties to the lower index, by a plain sort (independent reference)."""
    eligible = [i for i, s in enumerate(scores) if s == s and s > floor]
    return sorted(sorted(eligible, key=lambda i: (-scores[i], i))[:k])


@needs_compiler
@pytest.mark.parametrize(
    "n,k,floor",
    [
        (0, 3, -float("inf")),
        (9, 0, -float("inf")),
        (9, 4, -float("inf")),
        (1000, 60999, -float("inf")),
        (1000, 300, 0.5),
        (70001, 20000, -float("inf")),
        (70001, 69000, 0.25),
    ],
)
def test_the_selection_kernel_takes_the_k_best_with_ties_to_the_lower_index(n, k, floor):
    from sparsec.runtime.cpp import cpp_best_in_row

    g = torch.Generator().manual_seed(n + k)
    scores = torch.randint(0, 50, (n,), generator=g).float() / 50  # many ties at every score
    if n > 100:
        scores[::7] = -float("inf")  # masked (kept) positions
        scores[5::13] = float("nan")
        scores[11::101] = torch.rand(scores[11::101].shape, generator=g)  # distinct scores too
    got = cpp_best_in_row(scores, k, floor)
    expected = _best_by_sorting(scores.tolist(), k, floor)
    assert got.tolist() == expected
    values = scores.tolist()
    ranked = sorted((i for i, v in enumerate(values) if v == v and v > floor), key=lambda i: (-values[i], i))
    if n > 100 and k < len(ranked):  # the tie rule decides: equal scores on both sides of the cut
        assert values[ranked[k - 1]] == values[ranked[k]]
    assert n < 100 or (k < len(ranked)) == (k < 60000)  # k >= 60000 here: fewer qualify, all are taken


@needs_compiler
@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 7), (37, 129), (500, 64)])
def test_the_per_row_selection_kernel_takes_each_row_s_k_best_with_ties_to_the_lower_column(rows, cols):
    """Fan-in rows and N:M groups: each row its own k (0, short of its qualifying entries, or more than the
    row), many ties, -inf (kept) and NaN never taken; flat indices ascending."""
    from sparsec.runtime.cpp import cpp_best_per_row

    g = torch.Generator().manual_seed(rows * cols)
    scores = torch.randint(-3, 6, (rows, cols), generator=g).float() / 3  # negative scores and ties
    scores[torch.rand(rows, cols, generator=g) < 0.3] = -float("inf")
    scores.view(-1)[5::17] = float("nan")
    scores.view(-1)[3::29] = float("inf")
    k = torch.randint(0, cols + 3, (rows,), generator=g)
    got = cpp_best_per_row(scores, k)
    expected = []
    for r, row in enumerate(scores.tolist()):
        expected += [r * cols + c for c in _best_by_sorting(row, int(k[r]), -float("inf"))]
    assert got.tolist() == expected
    assert rows < 30 or any(len(_best_by_sorting(row, cols, -float("inf"))) < int(k[r]) for r, row in enumerate(
        scores.tolist()))  # fmt: skip


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_training_hands_the_forwards_tiles_to_the_gradient_dots(dtype, monkeypatch):
    """At 1% density (below TILE_DOTS_DENSITY) eager training's gradient dots read the batch tiles the
    forward made of x and grad_input made of dy (through autograd's ctx); the gradients match float64,
    for two layers sharing one input, and again after the input changed in place."""
    from sparsec.runtime import cpp

    torch.manual_seed(3)
    layers = [sparsec.SparseLinear(2100, out, spec="99%", dtype=dtype) for out in (40, 56)]
    assert layers[0].values.numel() < cpp.TILE_DOTS_DENSITY * 40 * 2100
    x = torch.randn(70, 2100, dtype=dtype, requires_grad=True)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    read_tiles = []
    lib = cpp._library(*cpp.KERNEL_TYPES[dtype], "uint16_t", "int32_t")
    real = lib.sparsec_rows_sddmm_tiles
    monkeypatch.setattr(lib, "sparsec_rows_sddmm_tiles", lambda *a: read_tiles.append(1) or real(*a))
    for step in range(2):
        for layer in layers:
            layer.zero_grad()
        x.grad = None
        dys = [torch.randn(70, layer.out_features, dtype=dtype) for layer in layers]
        with config.patch(backend="cpp"):
            ys = [layer(x) for layer in layers]
            torch.autograd.backward(ys, dys)
        assert len(read_tiles) == 2 * (step + 1)  # both layers' dots read the step's tiles
        x64 = x.detach().double()
        for layer, y, dy in zip(layers, ys, dys, strict=True):
            w = layer.dense_weight().double()
            torch.testing.assert_close(y.double(), x64 @ w.T + layer.bias.double(), **tol)
            full = (dy.double().T @ x64).view(layer.weight_shape)
            expected = layer.layout.values_from_dense(full, layer.positions())
            torch.testing.assert_close(layer.values.grad.double(), expected, **tol)
        dx = sum(dy.double() @ m.dense_weight().double() for m, dy in zip(layers, dys, strict=True))
        torch.testing.assert_close(x.grad.double(), dx, **tol)
        with torch.no_grad():
            x.add_(1.0)  # the next step's input differs: its tiles are made again


@needs_compiler
@pytest.mark.parametrize("batch", [16, 17, 33, 129])  # one vector, one tile and a row, several tiles
@pytest.mark.parametrize(
    "spec,out,inn",
    [
        ("block(2x2, 95%)", 38, 46),
        ("block(1x7, 60%)", 9, 49),
        ("block(7x1, 60%)", 49, 9),
        ("block(9x6, 50%)", 27, 36),
        ("block(12x20, 0%)", 12, 20),
    ],  # the last: one block covers the layer
)
def test_blocks_run_on_the_micro_tile_kernels_and_match(spec, out, inn, batch, monkeypatch):
    from sparsec.runtime import cpp

    layer, x = _case(spec, out, inn, batch, torch.float32)
    lib = cpp._library("float", "float", "int32_t", "int32_t")
    ran = []
    for name in ("sparsec_block_spmm", "sparsec_block_sddmm"):
        real = getattr(lib, name)
        monkeypatch.setattr(lib, name, lambda *a, real=real, name=name: ran.append(name) or real(*a))
    dy = torch.randn(batch, out)
    with config.patch(backend="cpp"):
        y = layer(x)
        y.backward(dy)
    plan = plans.held_plan(list(layer.index_buffers().values()), "cpp")
    assert plan.block == layer.layout.item and sorted(ran) == ["sparsec_block_sddmm", *["sparsec_block_spmm"] * 2]
    w, x64, dy64 = layer.dense_weight().double(), x.detach().double(), dy.double()
    tol = {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(y.double(), x64 @ w.T + layer.bias.detach().double(), **tol)
    torch.testing.assert_close(x.grad.double(), dy64 @ w, **tol)
    expected = layer.layout.values_from_dense((dy64.T @ x64).view(layer.weight_shape), layer.positions())
    torch.testing.assert_close(layer.values.grad.double(), expected, **tol)
    torch.testing.assert_close(layer.bias.grad.double(), dy64.sum(0), **tol)


@needs_compiler
@pytest.mark.parametrize("spec,held", [("99%", True), ("90%", False), ("block(4x8, 97%)", False)])
def test_the_forwards_tiles_are_held_only_where_the_gradient_dots_read_them(spec, held):
    layer, x = _case(spec, 40, 2048, 70, torch.float32)
    with config.patch(backend="cpp"):
        y = layer(x)
    assert (y.grad_fn.x_tiles is not None) == held
    y.sum().backward()
    assert y.grad_fn.x_tiles is None  # released by the backward


@needs_compiler
def test_eager_training_differentiates_twice_as_the_op_does():
    """create_graph: the eager Function's backward is the op's, so the bias gradient is differentiable
    and grad_input's double backward is refused, as on the op path."""
    results = []
    for backend in ("cpp", "cpu"):  # cpu: through the custom op
        layer, x = _case("90%", 21, 40, 33, torch.float32)
        with config.patch(backend=backend):
            loss = (layer(x) ** 2).sum()
            (gb,) = torch.autograd.grad(loss, layer.bias, create_graph=True)
            (ggx,) = torch.autograd.grad(gb.pow(2).sum(), x)
            results.append(ggx)
            with pytest.raises(RuntimeError):
                loss = (layer(x) ** 2).sum()
                (gx,) = torch.autograd.grad(loss, x, create_graph=True)
                torch.autograd.grad(gx.sum(), layer.values)
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-4)
    assert results[0].abs().sum() > 0


BF16_WITHOUT_DOTS = """
import sys
import torch
import sparsec
from sparsec import config
from sparsec.codegen import cpp
from sparsec.runtime import cpp as kernels

cpp.FLAGS = (*cpp.FLAGS, "-mno-avx512bf16")  # a CPU without AVX512-BF16: bf16 widened to fp32
cpp._identity.cache_clear()
assert kernels._library("float", "bf16", "uint16_t", "int32_t").sparsec_work_bytes() == 4
worst = 0.0
for spec, out, inn in [("block(3x5, 75%)", 21, 35), ("90%", 37, 53), ("99%", 40, 2100)]:
    for batch in (1, 33, 70):
        torch.manual_seed(batch)
        layer = sparsec.SparseLinear(inn, out, spec=spec).to(torch.bfloat16)
        x = torch.randn(batch, inn).to(torch.bfloat16).requires_grad_()
        dy = torch.randn(batch, out).to(torch.bfloat16)
        with config.patch(backend="cpp"):
            y = layer(x)
            y.backward(dy)
        w, x64 = layer.dense_weight().double(), x.detach().double()
        full = (dy.double().T @ x64).view(layer.weight_shape)
        pairs = [(y, x64 @ w.T + layer.bias.detach().double()), (x.grad, dy.double() @ w),
                 (layer.values.grad, layer.layout.values_from_dense(full, layer.positions()))]
        for got, ref in pairs:
            worst = max(worst, ((got.double() - ref).abs() / (ref.abs() + 1)).max().item())
print("worst", worst)
"""


@needs_compiler
@pytest.mark.slow  # a build for another CPU in a subprocess
def test_bf16_on_a_cpu_without_bf16_dots_matches_the_reference(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "SPARSEC_CACHE_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", BF16_WITHOUT_DOTS], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.split()[-1]) < 3e-2  # bf16 precision
