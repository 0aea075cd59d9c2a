"""The bottom layer: sparsity specs and policy values (pure data), their grammar and their checks."""

from sparsec.spec.policy import REGISTRY, Policy, parse_policy
from sparsec.spec.specs import (
    NM,
    SPEC_TYPES,
    Block,
    Dense,
    FanIn,
    Spec,
    Unstructured,
    describe_spec,
    parse_spec,
    unstructured_with,
)

__all__ = [
    "NM",
    "SPEC_TYPES",
    "REGISTRY",
    "Block",
    "Dense",
    "FanIn",
    "Policy",
    "Spec",
    "Unstructured",
    "describe_spec",
    "parse_policy",
    "parse_spec",
    "unstructured_with",
]
