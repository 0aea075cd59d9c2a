"""The lowering pipeline: one ordered list of named passes, each a function Program -> Program.

With ``SPARSEC_VERIFY=1`` the IR verifier runs before the first pass and after every pass.
"""

from __future__ import annotations

from sparsec import config
from sparsec.ir.graph import Program
from sparsec.ir.verify import verify
from sparsec.passes.constraints import check_constraints
from sparsec.passes.cost import cost_model
from sparsec.passes.format import choose_format
from sparsec.passes.fusion import fuse_epilogue
from sparsec.passes.tiling import tile

PIPELINE = [
    ("choose_format", choose_format),  # storage format + kernel strategy of the sparse weight
    ("check_constraints", check_constraints),  # divisibility rules, explained in the user's terms
    ("fuse_epilogue", fuse_epilogue),  # bias and activation into the SPMM's store
    ("tile", tile),  # tile sizes (kernel constexprs) per product
    ("cost_model", cost_model),  # FLOPs and bytes formulas per product
]


def lower(program: Program) -> tuple[Program, list[str]]:
    """Run every pass in order; returns the lowered program and the names of the passes applied."""
    check = config.verify
    if check:
        verify(program)
    applied = []
    for name, run in PIPELINE:
        program = run(program)
        applied.append(name)
        if check:
            verify(program)
    return program, applied
