"""choose_format: pick the storage format and the kernel strategy of the sparse weight."""

from __future__ import annotations

from sparsec.ir.graph import Program
from sparsec.ir.ops import Op
from sparsec.spec import NM, Block, FanIn, parse_spec


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def strategy_for(spec) -> tuple[str, str, str]:
    """(format, strategy, why) for a spec."""
    if isinstance(spec, NM):
        if _is_pow2(spec.m):
            return (
                "nm",
                "decompress-dot",
                (
                    "N:M values are decompressed to a dense tile in registers and fed to tl.dot: Triton has no "
                    "sparse tensor-core dot, so this saves bytes (values + 1-byte positions), not FLOPs"
                ),
            )
        return "nm", "gather", f"M={spec.m} is not a power of two: no register tile of M columns; gathers inputs"
    if isinstance(spec, Block):
        return (
            "bsr",
            "block-dot",
            (
                "each kept block is one tl.dot (sides padded to powers of two, at least 16, for tensor cores); "
                "a program walks one block row"
            ),
        )
    if isinstance(spec, FanIn):
        return "ell", "gather", "constant fan-in rows gather their k inputs: no wasted work, CUDA cores"
    return "csr", "gather", "compressed rows gather their inputs; rows of unequal length are masked"


def choose_format(program: Program) -> Program:
    """Attach ``format``, ``strategy`` and the reason to the SPARSE node (the rest of the pipeline reads them)."""
    for nid in program.find(Op.SPARSE):
        node = program.node(nid)
        fmt, strategy, why = strategy_for(parse_spec(node.attr("spec")))
        program = program.replace_node(nid, node.with_attrs(format=fmt, strategy=strategy, why=why))
    return program
