import dataclasses

import networkx as nx
import pytest
import torch
from helpers import SPECS_AND_SHAPES, assert_close

import sparsec
from sparsec.errors import IRVerifyError
from sparsec.ir.build import PROGRAMS, build_programs
from sparsec.ir.graph import SYM, Program, program_key
from sparsec.ir.interp import interpret, weight_layout
from sparsec.ir.ops import Op
from sparsec.ir.printer import print_program
from sparsec.ir.verify import verify


@pytest.mark.parametrize("spec,out,inn", SPECS_AND_SHAPES)
def test_every_program_verifies_and_prints_stably(spec, out, inn):
    programs = build_programs(spec, inn, out, "fp16", bias=True, activation="relu", grow_k=2)
    assert tuple(programs) == PROGRAMS
    again = build_programs(spec, inn, out, "fp16", bias=True, activation="relu", grow_k=2)
    for name, program in programs.items():
        verify(program)
        assert print_program(program) == print_program(again[name])
        assert program_key(program) == program_key(again[name])


def test_key_ignores_node_ids_and_insertion_order():
    program = build_programs("2:4", 16, 8)["forward"]
    relabeled = nx.relabel_nodes(program.graph, {n: 100 - n for n in program.graph})
    shuffled = nx.DiGraph()
    shuffled.add_nodes_from(sorted(relabeled.nodes(data=True), key=lambda item: -item[0]))
    shuffled.add_edges_from(relabeled.edges(data=True))
    assert program_key(Program("forward", shuffled)) == program_key(program)


@pytest.mark.parametrize(
    "change",
    [
        dict(spec="1:4"),
        dict(in_features=32),
        dict(out_features=16),
        dict(dtype="bf16"),
        dict(bias=False),
        dict(activation="gelu"),
        dict(grow_k=4),
    ],
)
def test_every_build_field_changes_some_key(change):
    base = dict(spec="2:4", in_features=16, out_features=8, dtype="fp16", bias=True, activation="relu", grow_k=2)
    a, b = build_programs(**base), build_programs(**{**base, **change})
    assert {program_key(p) for p in a.values()} != {program_key(p) for p in b.values()}


def test_symbolic_values_shape_matches_the_storage_layout():
    for spec, out, inn in SPECS_AND_SHAPES:
        program = build_programs(spec, inn, out)["grad_values"]
        sddmm = program.node(program.find(Op.SDDMM)[0])
        concrete = tuple(int(s.subs({SYM.OUT: out, SYM.IN: inn})) for s in sddmm.shape)
        assert concrete == weight_layout(program).values_shape, spec


def _break(program: Program, nid: int, **changes) -> Program:
    return program.replace_node(nid, dataclasses.replace(program.node(nid), **changes))


def test_verifier_names_node_and_rule():
    program = build_programs("2:4", 16, 8, bias=True, activation="relu")["forward"]
    spmm = program.find(Op.SPMM)[0]
    with pytest.raises(IRVerifyError, match=r"forward: node \d+ \(spmm\): mixes dtypes \['fp16', 'fp32'\]"):
        verify(_break(program, spmm, dtype="fp16"))
    x = program.find(Op.DENSE)[0]
    with pytest.raises(IRVerifyError, match=r"\(spmm\): argument 0 has shape \(B, O\), needs \(B, I\)"):
        verify(_break(program, x, shape=program.node(spmm).shape))
    graph = program.graph.copy()
    graph.add_edge(program.find(Op.VECTOR)[0], spmm, arg=3)
    with pytest.raises(IRVerifyError, match=r"\(spmm\): takes 2 or 3 arguments numbered 0.., has \[0, 1, 3\]"):
        verify(Program("forward", graph))
    act = program.find(Op.ACTIVATION)[0]
    with pytest.raises(IRVerifyError, match="unknown activation 'tanh'"):
        verify(_break(program, act, attrs=(("fn", "tanh"),)))
    graph = program.graph.copy()
    graph.add_node(99, node=program.node(x))
    with pytest.raises(IRVerifyError, match=r"node 99 \(dense\): its result is never used"):
        verify(Program("forward", graph))


def test_build_errors():
    with pytest.raises(sparsec.SparsecError, match="dtype 'int8' is not supported"):
        build_programs("2:4", 16, 8, dtype="int8")
    with pytest.raises(sparsec.SparsecError, match="activation 'tanh'"):
        build_programs("2:4", 16, 8, activation="tanh")
    with pytest.raises(sparsec.SparsecError, match="no sparse programs"):
        build_programs("dense", 16, 8)


@pytest.mark.parametrize("spec,out,inn", SPECS_AND_SHAPES)
def test_interpreter_agrees_with_the_cpu_layer(spec, out, inn):
    layer = sparsec.SparseLinear(inn, out, spec=spec, dtype=torch.float64)
    programs = build_programs(spec, inn, out, "fp64", bias=True, activation="relu")
    x = torch.randn(6, inn, dtype=torch.float64, requires_grad=True)
    z = layer(x)
    dz = torch.randn_like(z)
    z.backward(dz)
    args = dict(values=layer.values.detach(), positions=layer.positions())
    y = interpret(programs["forward"], {"x": x.detach(), "bias": layer.bias.detach()}, **args)["y"]
    assert_close(y, torch.relu(z), torch.float64, "forward")
    dx = interpret(programs["grad_input"], {"dz": dz}, **args)["dx"]
    assert_close(dx, x.grad, torch.float64, "grad_input")
    dv = interpret(programs["grad_values"], {"dz": dz, "x": x.detach()}, **args)["dvalues"]
    assert_close(dv, layer.values.grad, torch.float64, "grad_values")


@pytest.mark.parametrize("spec,out,inn", SPECS_AND_SHAPES)
def test_passes_preserve_meaning(spec, out, inn):
    """interp(before) == interp(after) for every program after the whole pipeline."""
    from sparsec.passes import lower

    layer = sparsec.SparseLinear(inn, out, spec=spec, dtype=torch.float64)
    args = dict(values=layer.values.detach(), positions=layer.positions())
    tensors = {
        "x": torch.randn(5, inn, dtype=torch.float64),
        "dz": torch.randn(5, out, dtype=torch.float64),
        "bias": layer.bias.detach(),
    }
    with sparsec.config.patch(verify=True):  # the verifier also runs between the passes
        for name, program in build_programs(spec, inn, out, "fp64", bias=True, activation="gelu", grow_k=3).items():
            lowered, applied = lower(program)
            assert applied == ["choose_format", "check_constraints", "fuse_epilogue", "tile", "cost_model"]
            before, after = interpret(program, tensors, **args), interpret(lowered, tensors, **args)
            assert before.keys() == after.keys()
            for key in before:
                for a, b in zip(*(v if isinstance(v, tuple) else (v,) for v in (before[key], after[key])), strict=True):
                    assert torch.equal(a, b), (name, key)
            if name == "forward":
                assert len(lowered.find(Op.ADD_BIAS)) == 0 and len(lowered.find(Op.ACTIVATION)) == 0
