"""tile: attach the tile sizes (kernel constexprs) and the dot precision of every product.

The defaults, which the untuned path runs and the autotuner (``runtime.tuner``) searches around: the weight's format
picks them for its strategy, program and dtype (``Strategy.tiles``, ``Strategy.precision``), and the grid-shaping
constexprs start at 1 (``Strategy.grid_space``: no grouping, no batch split).
"""

from __future__ import annotations

from sparsec.formats import format_of
from sparsec.ir.graph import Program
from sparsec.ir.ops import PRODUCTS, Op


def tile(program: Program) -> Program:
    """Attach ``tile`` (sorted constexpr pairs) and the dot ``precision`` to every product node."""
    (weight,) = program.find(Op.SPARSE)
    w = program.node(weight)
    spec = w.attr("spec")
    strategy = format_of(spec).strategy(spec)
    for nid in program.order():
        node = program.node(nid)
        if node.op in PRODUCTS:
            name = PRODUCTS[node.op]
            sizes = {**strategy.tiles(name, w.dtype), **dict.fromkeys(strategy.grid_space(name), 1)}
            precision = strategy.precision(name, w.dtype)
            program = program.replace_node(nid, node.with_attrs(tile=tuple(sorted(sizes.items())), precision=precision))
    return program
