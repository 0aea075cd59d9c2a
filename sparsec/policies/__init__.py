"""One module per policy behind the ``Policy`` protocol (``policies.base``).

Importing this package imports every policy module, which registers each policy's name with the
parser (``sparsec.spec.policy.REGISTRY``), so layers resolve ``policy="rigl"`` strings. The order
below is the order the parser lists them in its errors.
"""

# isort: off
from sparsec.policies import static, set, rigl, srigl, snfs, gmp, snip, small_dense, imp  # noqa: F401
# isort: on
