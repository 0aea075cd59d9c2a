import math

import pytest
import torch
from torch import nn

import sparsec
from sparsec import SparsecError, SpecError, erk_densities, parse_policy
from sparsec.dsl.sparsify import plan_specs
from sparsec.formats import make_layout
from sparsec.policies.rigl import RigL
from sparsec.policies.schedule import cosine_drop_fraction
from sparsec.policies.set import SET
from sparsec.policies.static import Static


def test_policy_values_and_strings_agree():
    assert parse_policy("rigl") == sparsec.rigl == RigL(delta_t=100, alpha=0.3, t_end=0.75)
    assert parse_policy("rigl(delta_t=50, alpha=0.5)") == sparsec.rigl(delta_t=50, alpha=0.5)
    assert parse_policy("set") == sparsec.set_ and isinstance(sparsec.set_, SET)
    assert parse_policy(" static ") == sparsec.static and isinstance(sparsec.static, Static)
    assert parse_policy(str(sparsec.rigl(delta_t=7))) == sparsec.rigl(delta_t=7)
    assert parse_policy("srigl(regrow_dropped=True)") == sparsec.srigl(regrow_dropped=True)
    assert parse_policy("snfs(regrow_dropped=false)").regrow_dropped is False
    assert parse_policy(str(sparsec.set_(regrow_dropped=True))) == sparsec.set_(regrow_dropped=True)


@pytest.mark.parametrize(
    "text,message,column",
    [
        ("rigel", "unknown policy 'rigel'; choose one of static, set, rigl", 0),
        ("rigl(beta=1)", "policy 'rigl' has no parameter 'beta'", 5),
        ("rigl(delta_t=0)", "rigl: delta_t=0 must be an integer of at least 1", 0),
        ("rigl(alpha=2)", "rigl: alpha=2 must be in [0, 1]", 0),
        ("rigl(delta_t=5", "expected ',' or ')'", 14),
        ("set(alpha=)", "expected a number or a word for alpha", 10),
        ("static(alpha=0.1)", "policy 'static' has no parameter 'alpha'", 7),
        ("rigl(regrow_dropped=1)", "rigl: regrow_dropped=1 must be True or False", 0),
        ("gmp(regrow_dropped=True)", "policy 'gmp' has no parameter 'regrow_dropped'", 4),
    ],
)
def test_policy_errors(text, message, column):
    with pytest.raises(SpecError) as info:
        parse_policy(text)
    assert info.value.message.startswith(message), info.value.message
    assert info.value.column == column


def test_policy_call_rejects_unknown_parameters():
    with pytest.raises(SpecError, match="no parameter 'beta'"):
        sparsec.rigl(beta=1)


def test_cosine_schedule_values():
    # f(t) = alpha/2 (1 + cos(pi t / T_end)), T_end = 0.75 * total
    assert cosine_drop_fraction(0, 0.3, 0.75, 1000) == pytest.approx(0.3)
    assert cosine_drop_fraction(375, 0.3, 0.75, 1000) == pytest.approx(0.15)
    assert cosine_drop_fraction(750, 0.3, 0.75, 1000) == pytest.approx(0.0)
    p = sparsec.rigl
    steps = [t for t in range(1, 1001) if p.is_update_step(t, 1000)]
    assert steps == [100, 200, 300, 400, 500, 600, 700]  # t < 750 only
    assert not any(sparsec.static.is_update_step(t, 1000) for t in range(1, 1001))


def test_erk_against_hand_computed_values():
    shapes = [(10, 20), (20, 30), (30, 5)]
    # ones: 200-160=40, 600-480=120, 150-120=30 -> rhs=190; divisor=30+50+35=115; eps=190/115
    eps = 190 / 115
    expected = [eps * 30 / 200, eps * 50 / 600, eps * 35 / 150]
    assert erk_densities(shapes, 0.8) == pytest.approx(expected, rel=1e-12)
    kept = sum(n - math.floor((1 - d) * n) for d, n in zip(expected, (200, 600, 150), strict=True))
    assert abs(kept - 190) <= 3  # floor rounding per layer only


def test_erk_saturated_layers_become_dense_and_charge_the_budget():
    shapes = [(4, 4), (100, 100), (100, 100)]
    # first pass: eps = 2002/408 makes layer 0 (raw 0.5) > 1 -> dense, its floor(0.9*16)=14 zeros
    # are charged: rhs = 2000 - 14 = 1986, divisor = 400
    d = erk_densities(shapes, 0.9)
    assert d[0] == 1.0
    assert d[1] == d[2] == pytest.approx(1986 / 400 * 0.02, rel=1e-12)


def test_erk_tied_layers_saturate_together():
    d = erk_densities([(4, 4), (4, 4), (100, 100)], 0.9)
    assert d[:2] == [1.0, 1.0]
    assert d[2] == pytest.approx((1000 - 28) / 200 * 0.02, rel=1e-12)


def test_erk_user_dense_layers_are_left_out_of_solve_and_budget():
    d = erk_densities([(10, 20), (20, 30), (30, 5)], 0.8, dense=[0])
    eps = 150 / 85
    assert d == pytest.approx([1.0, eps * 50 / 600, eps * 35 / 150], rel=1e-12)


def test_erk_bad_input():
    with pytest.raises(SparsecError, match="outside"):
        erk_densities([(3, 3)], 1.0)
    with pytest.raises(SparsecError, match="out of range"):
        erk_densities([(3, 3)], 0.5, dense=[4])


def test_kept_count_is_n_minus_floor_sn():
    for s, (o, i) in [(0.9, (37, 53)), (0.7, (10, 10)), (0.29, (10, 10)), (0.5, (3, 3))]:
        layout = make_layout(sparsec.Unstructured(s), o, i)
        n = o * i
        assert layout.n_items == n - math.floor(s * n)  # 0.29 * 100 = 28.999..., so 72 kept


def test_plan_specs_dense_overrides_and_distribution():
    shapes = {"fc1": (256, 64), "blocks.0.attn.q": (64, 64), "blocks.0.mlp": (64, 64), "head": (10, 64)}
    specs = plan_specs(shapes, "90%", "erk", dense=["head"], overrides={"*.attn.*": "fanin(k=8)"})
    assert specs["head"] == sparsec.Dense()
    assert specs["blocks.0.attn.q"] == sparsec.FanIn(k=8)
    d = erk_densities([(256, 64), (64, 64)], 0.9)
    assert specs["fc1"].sparsity == pytest.approx(1 - d[0])
    assert specs["blocks.0.mlp"].sparsity == pytest.approx(1 - d[1])
    assert plan_specs(shapes, "90%")["fc1"] == sparsec.Unstructured(0.9)


def test_plan_specs_errors():
    shapes = {"fc1": (8, 8)}
    with pytest.raises(SparsecError, match=r"'fc2' matches no Linear/Conv2d layer; the layers are \['fc1'\]"):
        plan_specs(shapes, "90%", dense=["fc2"])
    with pytest.raises(SparsecError, match="fixes each layer's density"):
        plan_specs(shapes, "2:4", "erk")
    with pytest.raises(SparsecError, match="choose one of"):
        plan_specs(shapes, "90%", "lognormal")


def test_sparsify_replaces_layers_and_keeps_dense_ones():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 32), nn.Linear(32, 4)
    )
    sparsec.sparsify(model, spec="80%", policy="set(delta_t=5)", distribution="erk", dense=["4"])
    assert isinstance(model[0], sparsec.SparseConv2d) and isinstance(model[3], sparsec.SparseLinear)
    assert type(model[4]) is nn.Linear
    assert model[3].policy == sparsec.set_(delta_t=5)
    names = [n for n, _ in model.named_parameters()]
    assert "3.values" in names and not any(n.endswith("weight") for n in names[:-2])
    assert model(torch.randn(2, 3, 4, 4)).shape == (2, 4)


def test_sparse_decorator_on_nested_classes():
    @sparsec.sparse(spec="2:4", policy=sparsec.static)
    class Base(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)

    @sparsec.sparse(spec="2:4", policy=sparsec.static)
    class Child(Base):
        def __init__(self):
            super().__init__()
            self.b = nn.Linear(8, 4)

    child = Child()
    assert isinstance(child.a, sparsec.SparseLinear) and isinstance(child.b, sparsec.SparseLinear)
    with pytest.raises(SpecError):
        sparsec.sparse(spec="5:4")


def test_sparsify_errors_name_the_layer():
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(
        sparsec.ShapeError, match=r"^0 \(weight 8x10, spec 2:4\): in_features=10 is not divisible by M=4"
    ):
        sparsec.sparsify(model, spec="2:4")
    with pytest.raises(SparsecError, match="no nn.Linear or nn.Conv2d"):
        sparsec.sparsify(nn.ReLU())
    with pytest.raises(SparsecError, match="decorates torch.nn.Module classes"):
        sparsec.sparse()(int)


def test_erk_counts_conv_kernel_dimensions_and_floors_each_layers_zeros():
    """The TF reference rule on a conv and a linear layer at a sparsity where s * n is not an integer
    (numbers by hand): zeros floor(0.55 * 108) = 59 and floor(0.55 * 270) = 148, so the solve keeps
    49 + 122 = 171; raw densities (4+3+3+3)/108 and (10+27)/270; eps = 171 / (13 + 37) = 3.42."""
    d = erk_densities([(4, 3, 3, 3), (10, 27)], 0.55)
    assert d == pytest.approx([3.42 * 13 / 108, 3.42 * 37 / 270], rel=1e-12)
    # a conv is not its [out, in*kh*kw] matrix: (4 + 27) / 108 would be the raw density then
    assert d[0] != pytest.approx(171 / (31 + 37) * 31 / 108, rel=1e-6)


def test_sparsify_hands_erk_the_conv_kernel_shape():
    """Through sparsify: a Conv2d(3, 4, 3) and a Linear(27, 10) at 55% ERK get the densities above."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(27, 10))
    specs = plan_specs({"0": (4, 3, 3, 3), "2": (10, 27)}, sparsec.parse_spec("55%"), "erk", (), {})
    assert 1 - specs["0"].sparsity == pytest.approx(3.42 * 13 / 108, rel=1e-9)
    assert 1 - specs["2"].sparsity == pytest.approx(3.42 * 37 / 270, rel=1e-9)
    sparse = sparsec.sparsify(model, spec="55%", distribution="erk")
    assert sparse[0].spec == specs["0"] and sparse[2].spec == specs["2"]


def test_policies_declare_whether_updates_change_a_layer_s_density():
    """MaskUpdater refuses density changes on FSDP2-sharded layers up front by this flag."""
    moving = {"rigl": False, "set": False, "static": False, "snfs": True, "gmp": True, "imp": True}
    for name, changes in moving.items():
        assert parse_policy(name).changes_density is changes, name
    assert sparsec.srigl().changes_density and not sparsec.srigl(gamma_sal=0).changes_density  # ablation off
