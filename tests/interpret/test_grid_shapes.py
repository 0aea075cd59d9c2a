"""The grid-shaping constexprs in Triton's interpreter, against float64 on odd shapes: grad_values split
over batch shares (``SPLIT``: every share non-empty, the last one short) and two-axis grids walked in
groups (``GROUP``: a last group shorter than the rest)."""

import pytest
import torch
from helpers import assert_kernel_close

import sparsec
import sparsec.runtime.launch as launch
from sparsec.formats import format_of
from sparsec.runtime.compile import compile_layer
from sparsec.runtime.launch import LaunchConfig, Launcher

CASES = [("90%", 37, 53), ("2:4", 37, 52), ("block(16x16, 50%)", 48, 80), ("fanin(k=7)", 37, 53)]
BATCH = 61  # SPLIT=4 at BLOCK_B=8: shares of 16 rows, the last one 13


def _setup(spec, out, inn):
    torch.manual_seed(0)
    layer = sparsec.SparseLinear(inn, out, spec=spec, bias=False)
    launcher = Launcher(compile_layer(str(layer.spec), inn, out, "fp32", False, None), layer.layout, True, poison=True)
    return layer, launcher, launcher.plan(layer.index_buffers())


def _recording_grids(monkeypatch):
    grids = []
    real = launch.launch_grid

    def record(grid):
        grids.append(grid)
        return real(grid)

    monkeypatch.setattr(launch, "launch_grid", record)
    return grids


@pytest.mark.parametrize("split", [2, 4])
@pytest.mark.parametrize("spec,out,inn", CASES)
def test_split_batch_grad_values_sums_every_share(spec, out, inn, split, monkeypatch):
    layer, launcher, plan = _setup(spec, out, inn)
    grids = _recording_grids(monkeypatch)
    dz, x = torch.randn(BATCH, out), torch.randn(BATCH, inn)
    config = LaunchConfig((("BLOCK_B", 8), ("SPLIT", split)))
    dv = launcher.run("grad_values", plan, config, dz=dz, x=x, values=layer.values.detach())
    assert grids[-1][-1] == split  # the launch really had a split axis
    assert dv.dtype == layer.values.dtype and dv.shape == layer.values.shape
    ref = layer.layout.values_from_dense(dz.double().t() @ x.double(), layer.positions())
    assert_kernel_close(dv, ref, torch.float32, f"grad_values SPLIT={split}")


def _grouped(spec: str, program: str) -> bool:
    value = sparsec.parse_spec(spec)
    return "GROUP" in format_of(value).strategy(value).grid_space(program)


GROUPED = [(*case, p) for case in CASES for p in ("forward", "grad_input", "grad_values") if _grouped(case[0], p)]


def test_every_structure_groups_its_products_and_n_m_its_gradient_too():
    assert {(spec, p) for spec, _, _, p in GROUPED} == {
        (spec, p) for spec, _, _ in CASES for p in ("forward", "grad_input")
    } | {("2:4", "grad_values")}


@pytest.mark.parametrize("spec,out,inn,program", GROUPED)
def test_grouped_grids_give_the_same_products(spec, out, inn, program, monkeypatch):
    layer, launcher, plan = _setup(spec, out, inn)
    grids = _recording_grids(monkeypatch)
    w = layer.dense_weight().double()
    dz, x = torch.randn(BATCH, out), torch.randn(BATCH, inn)
    # groups of 3 of 8 batch tiles (3, 3, 2); grad_values: of 3 output tiles, 2 then 1
    sizes = (
        (("BLOCK_O", 16), ("BLOCK_K", 32), ("GROUP", 2)) if program == "grad_values" else (("BLOCK_B", 8), ("GROUP", 3))
    )
    config = LaunchConfig(sizes)
    operands = {"forward": {"x": x}, "grad_input": {"dz": dz}, "grad_values": {"dz": dz, "x": x}}[program]
    got = launcher.run(program, plan, config, values=layer.values.detach(), **operands)
    assert len(grids[-1]) == 2 and grids[-1][1] == 1 and grids[-1][0] >= 6  # one axis, more than one group
    want = {
        "forward": lambda: x.double() @ w.T,
        "grad_input": lambda: dz.double() @ w,
        "grad_values": lambda: layer.layout.values_from_dense(dz.double().t() @ x.double(), layer.positions()),
    }[program]()
    assert_kernel_close(got, want, torch.float32, f"{program} {config.text()}")


def test_grouped_and_split_grad_values_together(monkeypatch):
    layer, launcher, plan = _setup("2:4", 37, 52)
    grids = _recording_grids(monkeypatch)
    dz, x = torch.randn(BATCH, 37), torch.randn(BATCH, 52)
    config = LaunchConfig((("BLOCK_B", 16), ("BLOCK_O", 16), ("GROUP", 2), ("SPLIT", 2)))
    dv = launcher.run("grad_values", plan, config, dz=dz, x=x, values=layer.values.detach())
    assert grids[-1] == (3 * 2, 1, 2)  # 3 x 2 tiles of 16 x 32 flattened, then 2 batch shares on axis z
    ref = layer.layout.values_from_dense(dz.double().t() @ x.double(), layer.positions())
    assert_kernel_close(dv, ref, torch.float32, "grad_values GROUP=2 SPLIT=2")


def test_a_third_grid_axis_past_cuda_limits_is_refused():
    with pytest.raises(sparsec.SparsecError, match="does not fit CUDA's grid"):
        launch.launch_grid((4, 4, 70000))
    assert launch.launch_grid((4, 70000, 8)) == ((70000, 4, 8), {"SWAP": True})
