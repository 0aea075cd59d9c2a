"""choose_format: attach the storage format and the kernel strategy of the sparse weight (its Format picks)."""

from __future__ import annotations

from sparsec.formats import format_of
from sparsec.ir.graph import Program
from sparsec.ir.ops import Op


def choose_format(program: Program) -> Program:
    """Attach ``format``, ``strategy`` and the reason to the SPARSE node (the rest of the pipeline reads them)."""
    for nid in program.find(Op.SPARSE):
        node = program.node(nid)
        spec = node.attr("spec")
        fmt = format_of(spec)
        strategy = fmt.strategy(spec)
        program = program.replace_node(nid, node.with_attrs(format=fmt.name, strategy=strategy.name, why=strategy.why))
    return program
