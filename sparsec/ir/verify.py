"""The IR verifier: every rule a legal program keeps, checked between passes (SPARSEC_VERIFY=1)."""

from __future__ import annotations

import functools

from sparsec.errors import IRVerifyError
from sparsec.ir.graph import SYM, Node, Program
from sparsec.ir.ops import ACTIVATIONS, ARITY, Op
from sparsec.lazy import lazy_module

nx = lazy_module("networkx")  # loaded by the first graph built (lowering), not by import sparsec
sympy = lazy_module("sympy")  # loaded by the first symbolic expression (lowering), not by import sparsec


@functools.cache
def _signatures() -> tuple[dict, tuple]:
    """Expected argument ops and shapes of the products (None: any op / any shape), and SPMM's optional
    third argument (a fused bias); made at the first verify (the symbols load sympy)."""
    b, o, i = SYM.BATCH, SYM.OUT, SYM.IN
    products = {
        Op.SPMM: ((None, (b, i)), (Op.SPARSE, (o, i))),
        Op.SPMM_T: ((None, (b, o)), (Op.SPARSE, (o, i))),
        Op.SDDMM: ((None, (b, o)), (None, (b, i)), (Op.SPARSE, (o, i))),
        Op.GROW_TOPK: ((None, (b, o)), (None, (b, i)), (Op.SPARSE, (o, i))),
        Op.ADD_BIAS: ((None, (b, o)), (Op.VECTOR, (o,))),
    }
    return products, (Op.VECTOR, (o,))


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(sympy.simplify(x - y) == 0 for x, y in zip(a, b, strict=True))


def verify(program: Program) -> None:
    """Raise ``IRVerifyError`` naming the node and the rule it breaks."""
    graph = program.graph
    if not nx.is_directed_acyclic_graph(graph):
        raise IRVerifyError(f"{program.name}: the graph has a cycle")
    names: set[str] = set()
    for nid in graph:
        node = graph.nodes[nid].get("node")
        if not isinstance(node, Node):
            raise IRVerifyError(f"{program.name}: node {nid} carries no IR Node")
        where = f"{program.name}: node {nid} ({node.op.value})"
        arg_ids = sorted(a for _, _, a in graph.in_edges(nid, data="arg"))
        if arg_ids not in [list(range(n)) for n in ARITY[node.op]]:
            counts = " or ".join(map(str, ARITY[node.op]))
            raise IRVerifyError(f"{where}: takes {counts} arguments numbered 0.., has {arg_ids}")
        if node.op is not Op.OUTPUT and graph.out_degree(nid) == 0:
            raise IRVerifyError(f"{where}: its result is never used (dead node)")
        args = [program.node(a) for a in program.args(nid)]
        products, fused_bias = _signatures()
        signature = products.get(node.op, ())
        if node.op is Op.SPMM and len(args) == 3:
            signature = (*signature, fused_bias)
        for i, (want_op, want_shape) in enumerate(signature):
            if want_op is not None and args[i].op is not want_op:
                raise IRVerifyError(f"{where}: argument {i} must be {want_op.value}, is {args[i].op.value}")
            if not _same_shape(args[i].shape, want_shape):
                raise IRVerifyError(f"{where}: argument {i} has shape {args[i].shape}, needs {want_shape}")
        if node.op in (Op.ADD_BIAS, Op.ACTIVATION, Op.OUTPUT) and not _same_shape(node.shape, args[0].shape):
            raise IRVerifyError(f"{where}: shape {node.shape} differs from its argument's {args[0].shape}")
        if node.op in (Op.SPMM, Op.SPMM_T, Op.SDDMM, Op.ADD_BIAS, Op.ACTIVATION):
            dtypes = {a.dtype for a in args} | {node.dtype}
            if len(dtypes) != 1:
                raise IRVerifyError(f"{where}: mixes dtypes {sorted(dtypes)}")
        if node.op is Op.ACTIVATION and node.attr("fn") not in ACTIVATIONS:
            raise IRVerifyError(f"{where}: unknown activation {node.attr('fn')!r}")
        if node.op is Op.OUTPUT:
            name = node.attr("name")
            if not name or name in names:
                raise IRVerifyError(f"{where}: outputs need distinct names, got {name!r}")
            names.add(name)
    if not names:
        raise IRVerifyError(f"{program.name}: the program has no output")
