"""Policy values and their string form: ``"rigl"``, ``"rigl(delta_t=50, alpha=0.5)"``; errors carry a caret.

A policy value is pure data (its parameters, checked on construction); its algorithm lives in the
policy's own module in ``sparsec.policies``, which defines a subclass of ``Policy`` here. Each
subclass with a ``name`` registers itself, so the parser (and the layers, which take policy strings)
resolve names without importing the layers above them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

from sparsec.errors import SpecError
from sparsec.spec.specs import describe_token, tokenize

REGISTRY: dict[str, type[Policy]] = {}  # name -> policy class, in definition order


@dataclass(frozen=True)
class Policy:
    """Base of every policy value; calling one returns a copy with new parameters."""

    name: ClassVar[str] = "policy"
    # Initial values of a sparse layer unless the user says (``init=``): "dense", the dense init at the kept
    # positions; "sparse", each output rescaled for its own kept fan-in. Each policy takes its reference's.
    default_init: ClassVar[str] = "dense"
    changes_density: ClassVar[bool] = False  # updates may give a layer another kept count (a new values Parameter)

    def __call__(self, **params) -> Policy:
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise SpecError(
                f"policy {self.name!r} has no parameter {unknown[0]!r}; its parameters are {sorted(known) or 'none'}"
            )
        return dataclasses.replace(self, **params)

    def is_update_step(self, t: int, total_steps: int) -> bool:
        return False

    def drop_fraction(self, t: int, total_steps: int) -> float:
        return 0.0

    def initial_spec(self, target, shape: tuple[int, int]):
        """The spec an ``out x in`` layer (``shape``) starts from when ``target`` is where the policy leads
        it (most: the same)."""
        return target

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__ and not cls.__name__.startswith("_"):
            if cls.name in REGISTRY:
                raise SpecError(
                    f"a policy named {cls.name!r} exists already ({REGISTRY[cls.name].__qualname__}); give "
                    f"{cls.__qualname__} another name"
                )
            REGISTRY[cls.name] = cls  # the policy modules fill the registry the parser reads

    def __str__(self) -> str:
        params = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return f"{self.name}({params})" if params else self.name


def check_schedule(policy) -> None:
    """``delta_t`` a positive integer and ``t_end`` a fraction of total_steps in (0, 1]."""
    if not isinstance(policy.delta_t, int) or policy.delta_t < 1:
        raise SpecError(
            f"{policy.name}: delta_t={policy.delta_t!r} must be an integer of at least 1 (steps between updates)"
        )
    if not (isinstance(policy.t_end, (int, float)) and 0.0 < policy.t_end <= 1.0):
        raise SpecError(f"{policy.name}: t_end={policy.t_end!r} must be in (0, 1] (fraction of total_steps)")


def check_regrow(policy) -> None:
    if not isinstance(policy.regrow_dropped, bool):
        raise SpecError(
            f"{policy.name}: regrow_dropped={policy.regrow_dropped!r} must be True or False (whether just-dropped "
            f"weights compete with fresh positions for regrowth)"
        )


def check_fraction(policy, field: str, meaning: str) -> None:
    value = getattr(policy, field)
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
        raise SpecError(f"{policy.name}: {field}={value!r} must be in [0, 1] ({meaning})")


def parse_policy(policy: str | Policy) -> Policy:
    """Parse a policy string (or pass a policy value through)."""
    if isinstance(policy, Policy):
        return policy
    if not isinstance(policy, str):
        raise SpecError(
            f"a policy is a string such as 'rigl(delta_t=50)' or a value such as sparsec.rigl, not {policy!r}"
        )
    toks = tokenize(policy)
    first = toks[0]
    if first.kind != "word" or first.text.lower() not in REGISTRY:
        raise SpecError(
            f"unknown policy {describe_token(first)}; choose one of {', '.join(REGISTRY)}", policy, first.col
        )
    base = REGISTRY[first.text.lower()]()
    params: dict[str, int | float | bool | str] = {}
    i = 1
    if toks[i].text == "(":
        i += 1
        while toks[i].text != ")":
            key, eq, val = (toks[min(j, len(toks) - 1)] for j in (i, i + 1, i + 2))
            if key.kind != "word":
                raise SpecError(f"expected a parameter name but found {describe_token(key)}", policy, key.col)
            known = [f.name for f in dataclasses.fields(base)]
            if key.text not in known:
                raise SpecError(
                    f"policy {base.name!r} has no parameter {key.text!r}; its parameters are {known or 'none'}",
                    policy,
                    key.col,
                )
            if eq.text != "=":
                raise SpecError(f"expected '=' after {key.text} but found {describe_token(eq)}", policy, eq.col)
            if val.kind not in ("num", "word"):
                raise SpecError(
                    f"expected a number or a word for {key.text} but found {describe_token(val)}", policy, val.col
                )
            if val.kind == "word":
                params[key.text] = {"true": True, "false": False}.get(val.text.lower(), val.text)
            else:
                params[key.text] = int(val.text) if val.text.isdigit() else float(val.text)
            i = min(i + 3, len(toks) - 1)
            if toks[i].text == ",":
                i += 1
            elif toks[i].text != ")":
                raise SpecError(f"expected ',' or ')' but found {describe_token(toks[i])}", policy, toks[i].col)
        i += 1
    if toks[i].kind != "end":
        raise SpecError(f"unexpected {describe_token(toks[i])} after the policy", policy, toks[i].col)
    try:
        return base(**params)
    except SpecError as e:
        raise SpecError(e.message, policy, first.col) from None
