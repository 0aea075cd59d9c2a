"""sparsec.export: the exported copy gives the trained sparse model's outputs (fp32: 1e-5 relative), keeps
the mask exactly (a kept weight that is 0 stays in a CSR/BSR pattern), leaves the model as it was, and
refuses what a format cannot hold with the fix."""

import pytest
import torch
from torch import nn

import sparsec
from sparsec.deploy import CondensedLinear, SparseBSRLinear, SparseCSRLinear

SPECS = ["90%", "2:4", "block(4x4, 75%)", "fanin(75%)"]


def _trained(spec: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    sparsec.sparsify(model, spec=spec, policy=sparsec.rigl(delta_t=2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    updater = sparsec.MaskUpdater(model, opt, total_steps=20)
    for _ in range(5):  # a few steps and updates: values and masks moved from their initial ones
        model(torch.randn(8, 32)).pow(2).mean().backward()
        opt.step()
        updater.step()
        opt.zero_grad()
    return model


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("fmt", ["dense", "csr", "bsr", "condensed"])
def test_the_exported_model_gives_the_trained_model_s_outputs(spec, fmt):
    model = _trained(spec)
    if fmt == "bsr" and not spec.startswith("block"):
        with pytest.raises(sparsec.SparsecError, match="needs a block spec"):
            sparsec.export(model, fmt)
        return
    if fmt == "condensed" and spec not in ("2:4", "fanin(75%)"):  # rows of unequal kept counts
        with pytest.raises(sparsec.SparsecError, match="same kept count in every row"):
            sparsec.export(model, fmt)
        return
    out = sparsec.export(model, fmt)
    kinds = {"dense": nn.Linear, "csr": SparseCSRLinear, "bsr": SparseBSRLinear, "condensed": CondensedLinear}
    assert all(isinstance(out[i], kinds[fmt]) for i in (0, 2))
    x = torch.randn(5, 3, 32)  # leading dimensions pass through
    with torch.no_grad():
        want, got = model(x), out(x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert isinstance(model[0], sparsec.SparseLinear)  # the trained model is left as it was


def test_the_exported_pattern_is_the_mask_even_where_a_kept_weight_is_zero():
    model = _trained("90%")
    layer = model[0]
    with torch.no_grad():
        layer.values[:3] = 0.0
    weight = sparsec.export(model, "csr")[0].weight
    assert weight.layout == torch.sparse_csr and weight.values().numel() == layer.layout.nnz
    rows = torch.repeat_interleave(torch.arange(64), weight.crow_indices().diff())
    assert torch.equal(rows * 32 + weight.col_indices(), layer.positions())  # the zeros' positions too
    assert int((weight.values() == 0).sum()) >= 3 and torch.equal(weight.to_dense(), layer.dense_weight())


def test_a_sparse_conv_exports_dense_and_refuses_torch_s_sparse_layouts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    sparsec.sparsify(model, spec="75%")
    out = sparsec.export(model, "dense")
    assert isinstance(out[0], nn.Conv2d)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        assert torch.allclose(out(x), model(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(sparsec.SparsecError, match="format='dense'"):
        sparsec.export(model, "csr")


def test_a_condensed_layer_holds_16_bit_indices_and_its_fan_in_values():
    layer = sparsec.export(_trained("fanin(75%)"), "condensed")[0]
    assert layer.indices.dtype == torch.int16 and tuple(layer.values.shape) == (64, 8)  # 25% of 32 inputs


def test_semi_structured_is_refused_off_cuda_and_off_2_4_with_the_fix():
    with pytest.raises(sparsec.SparsecError, match=r"on CUDA in fp16 or bf16.*model.cuda\(\).half\(\)"):
        sparsec.export(_trained("2:4"), "semi_structured")
    with pytest.raises(sparsec.SparsecError, match="PyTorch's 2:4 layout"):
        sparsec.export(_trained("90%"), "semi_structured")


def test_an_unknown_format_is_refused_with_the_choices():
    with pytest.raises(sparsec.SparsecError, match="dense, csr, bsr, condensed, semi_structured"):
        sparsec.export(_trained("90%"), "onnx")


def test_the_dense_export_runs_under_torch_export():
    out = sparsec.export(_trained("2:4"), "dense")
    program = torch.export.export(out, (torch.randn(4, 32),))
    x = torch.randn(4, 32)
    assert torch.allclose(program.module()(x), out(x))


def _srigl_trained(model: nn.Module, dense: list[str]) -> nn.Module:
    """SRigL with a high saliency threshold, so its first sparse layers ablate outputs (rows of 0 kept); then
    biases away from 0: an ablated output's constant must reach the next layer."""
    torch.manual_seed(0)
    sparsec.sparsify(model, spec="fanin(90%)", policy=sparsec.srigl(delta_t=2, gamma_sal=0.9), dense=dense)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    updater = sparsec.MaskUpdater(model, opt, total_steps=20)
    for _ in range(6):
        model(torch.randn(8, 32)).pow(2).mean().backward()
        opt.step()
        updater.step()
        opt.zero_grad()
    with torch.no_grad():
        for m in model:
            if getattr(m, "bias", None) is not None:
                m.bias.uniform_(-0.5, 0.5)
    return model


def _ablated(between: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), between, nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    return _srigl_trained(model, dense=["4"])


def _active_rows(layer) -> int:
    return int((torch.bincount(layer.positions() // layer.layout.in_features, minlength=64) > 0).sum())


def test_a_condensed_export_removes_srigl_s_ablated_outputs_and_their_inputs_to_the_next_layer():
    model = _ablated(nn.GELU())  # elementwise: the ablated outputs' GELU(bias) folds into the next bias
    active = _active_rows(model[0])
    assert 0 < active < 64  # the case really ablates
    out = sparsec.export(model, "condensed")
    assert (out[0].out_features, out[0].values.shape[0], out[0].outputs) == (active, active, None)
    assert out[2].in_features == active and int(out[2].indices.max()) < active
    x = torch.randn(6, 32)
    with torch.no_grad():
        assert torch.allclose(out(x), model(x), rtol=1e-5, atol=1e-6)


def test_a_condensed_layer_before_a_mixing_module_computes_only_its_active_outputs():
    model = _ablated(nn.LayerNorm(64))  # mixes features: the ablated outputs stay, as the bias alone
    active = _active_rows(model[0])
    assert 0 < active < 64
    out = sparsec.export(model, "condensed")
    assert out[0].out_features == 64 and out[0].values.shape[0] == active == out[0].outputs.numel()
    x = torch.randn(6, 32)
    with torch.no_grad():
        assert torch.allclose(out(x), model(x), rtol=1e-5, atol=1e-6)


def test_the_condensed_export_runs_under_torch_export_ablated_outputs_included():
    out = sparsec.export(_ablated(nn.LayerNorm(64)), "condensed")
    assert out[0].outputs is not None  # the scatter of the computed outputs is in the graph
    program = torch.export.export(out, (torch.randn(4, 32),))
    x = torch.randn(4, 32)
    with torch.no_grad():
        assert torch.allclose(program.module()(x), out(x))


# The tolerance of each dtype, relative to the largest output: float64 agrees to rounding; the half dtypes
# agree exactly where the export runs the trained model's own dense product (dense) and within their
# precision where it sums in another order (condensed)
_TOLERANCE = {torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", list(_TOLERANCE))
@pytest.mark.parametrize(
    "spec,fmt", [("90%", "dense"), ("90%", "csr"), ("block(4x4, 75%)", "bsr"), ("fanin(75%)", "condensed")]
)
def test_the_export_keeps_the_outputs_in_each_dtype_within_its_tolerance(dtype, spec, fmt):
    model = _trained(spec).to(dtype)
    if fmt in ("csr", "bsr") and dtype != torch.float64:
        with pytest.raises(sparsec.SparsecError, match=r"no torch\.(bfloat16|float16) kernel off CUDA.*model\.float"):
            sparsec.export(model, fmt)
        return
    x = torch.randn(6, 32, dtype=dtype)
    with torch.no_grad():
        want, got = model(x), sparsec.export(model, fmt)(x)
    assert got.dtype == dtype
    want, got = want.double(), got.double()
    assert float((got - want).abs().max()) <= _TOLERANCE[dtype] * float(want.abs().max())


@pytest.mark.parametrize("bias", [True, False])
def test_ablated_outputs_fold_into_a_dense_next_layer(bias):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 64, bias=bias), nn.GELU(), nn.Linear(64, 64, bias=bias), nn.ReLU(), nn.Linear(64, 10)
    )
    model = _srigl_trained(model, dense=["2"])  # layer 4 is the last sparse one: it never ablates
    active = _active_rows(model[0])
    assert 0 < active < 64
    out = sparsec.export(model, "condensed")
    assert isinstance(out[2], nn.Linear) and out[2].in_features == active == out[0].out_features
    x = torch.randn(6, 32)
    with torch.no_grad():
        assert torch.allclose(out(x), model(x), rtol=1e-5, atol=1e-6)


def test_two_ablated_condensed_layers_in_a_row_compact_into_each_other():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    model = _srigl_trained(model, dense=["6"])
    first, second = _active_rows(model[0]), _active_rows(model[2])
    assert 0 < first < 64 and 0 < second < 64  # both ablate: the first folds into a layer with ablated outputs
    out = sparsec.export(model, "condensed")
    assert (out[0].out_features, out[2].in_features, out[2].out_features, out[4].in_features) == (
        first,
        first,
        second,
        second,
    )
    x = torch.randn(6, 32)
    with torch.no_grad():
        assert torch.allclose(out(x), model(x), rtol=1e-5, atol=1e-6)
