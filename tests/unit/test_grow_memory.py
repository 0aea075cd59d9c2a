"""The grow step never materialises the dense gradient: its extra memory follows the chunk budget."""

import pytest
import torch
from helpers import peak_allocated_bytes

import sparsec
from sparsec import MaskUpdater, SparseLinear, config
from sparsec.policies.snfs import MomentumShadow

OUT = IN = 2048  # the dense fp32 gradient would be 16 MiB
BUDGET = 256 * 1024


@pytest.mark.parametrize("spec", ["99%", "fanin(k=16)", "block(16x16, 99%)"])
def test_armed_step_extra_memory_is_bounded_by_the_chunk_budget(spec):
    layer = SparseLinear(IN, OUT, spec=spec, policy=sparsec.rigl(delta_t=1))
    x = torch.randn(32, IN, requires_grad=True)

    def backward():
        layer(x).square().sum().backward()

    backward()  # warm-up: builds and caches the layer's CSR plan
    with config.patch(grow_chunk_bytes=BUDGET):
        plain = peak_allocated_bytes(backward)
        updater = MaskUpdater(layer, torch.optim.SGD(layer.parameters(), lr=0.1), total_steps=100)
        assert layer.grow_capture is not None  # armed for step 1
        changes = {}
        armed = peak_allocated_bytes(lambda: (backward(), changes.update(updater.step())))  # grows at the update
    extra = armed - plain
    dense_bytes = OUT * IN * 4
    nnz_bytes = layer.layout.nnz * 4
    # a chunk of scores, its sort (values + int64 indices) and candidate lists that scale with nnz
    assert extra <= 4 * BUDGET + 8 * nnz_bytes, (extra, BUDGET, nnz_bytes)
    assert extra < dense_bytes / 4, (extra, dense_bytes)
    assert changes == {"": updater.last_changes[""]} and updater.last_dropped[""] > 0


def test_the_probe_sees_a_dense_gradient_when_the_budget_allows_one():
    """Guards the test above: with one chunk as large as the layer, the extra is the dense size (the cpu
    backend's chunked selection: the cpp backend's fused scan of a layer-wide unit stores no chunk at all)."""
    layer = SparseLinear(IN, OUT, spec="99%", policy=sparsec.rigl(delta_t=1))
    x = torch.randn(32, IN)

    def backward():
        layer(x).sum().backward()

    with config.patch(backend="cpu"):
        backward()
        plain = peak_allocated_bytes(backward)
        with config.patch(grow_chunk_bytes=OUT * IN * 24):  # one chunk: the whole layer
            updater = MaskUpdater(layer, None, total_steps=100)
            armed = peak_allocated_bytes(lambda: (backward(), updater.step()))
    assert armed - plain >= OUT * IN * 4


def test_the_snfs_shadow_folds_the_gradient_in_chunks_within_the_budget():
    layer = SparseLinear(IN, OUT, spec="99%", policy=sparsec.snfs(delta_t=1000))
    shadow = MomentumShadow(layer, torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9))
    dy, x = torch.randn(32, OUT), torch.randn(32, IN)
    with config.patch(grow_chunk_bytes=BUDGET):
        chunked = peak_allocated_bytes(lambda: shadow.observe(dy, x))
    with config.patch(grow_chunk_bytes=OUT * IN * 24):  # guard: one chunk is the dense gradient
        whole = peak_allocated_bytes(lambda: shadow.observe(dy, x))
    assert chunked <= BUDGET, (chunked, BUDGET)
    assert whole >= OUT * IN * 4, whole


def _srigl_update_peak(budget: int) -> int:
    torch.manual_seed(0)
    layer = SparseLinear(IN, OUT, spec="fanin(k=16)", policy=sparsec.srigl(delta_t=1))
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    with config.patch(grow_chunk_bytes=budget):
        updater = MaskUpdater(layer, opt, total_steps=100)
        layer(torch.randn(32, IN)).square().sum().backward()  # the armed backward keeps dY and X
        opt.step()
        peak = peak_allocated_bytes(updater.step)
    assert updater.last_changes[""] > 0
    return peak


def test_the_srigl_update_scans_the_gradient_in_chunks_within_the_budget():
    small, budget = IN * 24 * 32, 4 * 2**20  # chunks of 32 rows; of a quarter of the dense gradient
    base, chunked = _srigl_update_peak(small), _srigl_update_peak(budget)
    assert chunked - base <= budget, (chunked, base, budget)  # what a larger chunk adds stays in its budget
    assert base < OUT * IN * 4 / 4, base  # the rest scales with nnz and the outputs
