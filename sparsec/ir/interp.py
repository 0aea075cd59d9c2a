"""The reference interpreter: plain torch on dense views; it defines what every op means.

Passes are tested by ``interpret(before) == interpret(after)``; kernels are compared with it.
"""

from __future__ import annotations

import torch

from sparsec.formats import Layout, item_scores, layout_of
from sparsec.ir.graph import Program
from sparsec.ir.ops import Op

_ACT = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu}


def weight_layout(program: Program) -> Layout:
    node = program.node(program.find(Op.SPARSE)[0])
    return layout_of(str(node.attr("spec")), node.attr("out_features"), node.attr("in_features"))


def grow_topk(layout: Layout, scores: torch.Tensor, kept: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per unit, the ``k`` best item scores outside ``kept`` (ties: lower flat index); -1 pads."""
    flat_scores = item_scores(layout, scores).reshape(-1).clone()
    flat_scores[kept] = -torch.inf
    per_unit = flat_scores.view(layout.n_units, layout.unit_size)
    order = torch.sort(per_unit, dim=1, descending=True, stable=True)
    top, idx = order.values[:, :k], order.indices[:, :k]
    flat = idx + torch.arange(layout.n_units)[:, None] * layout.unit_size
    flat[top == -torch.inf] = -1
    return flat, top.clamp(min=0)


def interpret(program: Program, tensors: dict[str, torch.Tensor], values: torch.Tensor, positions: torch.Tensor):
    """Run ``program`` on named dense tensors and the weight (stored ``values``, sorted ``positions``)."""
    layout = weight_layout(program)
    env: dict[int, object] = {}
    results = {}
    for nid in program.order():
        node, args = program.node(nid), [env[a] for a in program.args(nid)]
        op = node.op
        if op in (Op.DENSE, Op.VECTOR):
            env[nid] = tensors[node.attr("name")]
        elif op is Op.SPARSE:
            env[nid] = layout.to_dense(values, positions)
        elif op is Op.SPMM:  # after fuse_epilogue: a third argument (bias) and an activation attribute
            y = args[0] @ args[1].t()
            if len(args) == 3:
                y = y + args[2]
            env[nid] = _ACT[node.attr("activation")](y) if node.attr("activation") else y
        elif op is Op.SPMM_T:
            env[nid] = args[0] @ args[1]
        elif op is Op.SDDMM:
            env[nid] = layout.values_from_dense(args[0].t() @ args[1], positions)
        elif op is Op.GROW_TOPK:
            env[nid] = grow_topk(layout, (args[0].t() @ args[1]).abs(), positions, node.attr("k"))
        elif op is Op.ADD_BIAS:
            env[nid] = args[0] + args[1]
        elif op is Op.ACTIVATION:
            env[nid] = _ACT[node.attr("fn")](args[0])
        elif op is Op.OUTPUT:
            results[node.attr("name")] = args[0]
        else:  # pragma: no cover - every op has a branch; the verifier rejects unknown ones
            raise AssertionError(f"no interpreter rule for {op}")
    return results
