"""sparsec: declared sparsity, real compressed layers, and RigL-family mask updates.

Stable import paths: the names in ``__all__`` below, ``sparsec.config`` and ``sparsec.errors``.
Everything else (``sparsec.formats``, ``sparsec.policies.decision``, ...) is internal and may
change between releases.
"""

from sparsec import config
from sparsec.deploy import export
from sparsec.dsl.sparsify import sparse, sparsify
from sparsec.errors import ShapeError, SparsecError, SparsecWarning, SpecError
from sparsec.explainer import explain, step_flops
from sparsec.nn.layers import SparseConv2d, SparseLinear
from sparsec.policies.decision import rigl_step
from sparsec.policies.distributions import erk_densities
from sparsec.policies.gmp import gmp
from sparsec.policies.imp import imp, imp_rounds
from sparsec.policies.rigl import rigl
from sparsec.policies.set import set_
from sparsec.policies.small_dense import small_dense
from sparsec.policies.snfs import snfs
from sparsec.policies.snip import snip
from sparsec.policies.srigl import srigl
from sparsec.policies.static import static
from sparsec.spec import NM, Block, Dense, FanIn, Unstructured, describe_spec, parse_policy, parse_spec
from sparsec.train.updater import MaskUpdater

__version__ = "0.1.0"

__all__ = [
    "NM",
    "Block",
    "Dense",
    "FanIn",
    "Unstructured",
    "describe_spec",
    "parse_spec",
    "parse_policy",
    "SparseLinear",
    "SparseConv2d",
    "sparsify",
    "sparse",
    "static",
    "set_",
    "rigl",
    "srigl",
    "snfs",
    "gmp",
    "snip",
    "imp",
    "imp_rounds",
    "small_dense",
    "MaskUpdater",
    "export",
    "rigl_step",
    "erk_densities",
    "SparsecError",
    "SpecError",
    "ShapeError",
    "SparsecWarning",
    "config",
    "explain",
    "step_flops",
]
