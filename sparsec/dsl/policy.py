"""Policy strings: ``"rigl"``, ``"rigl(delta_t=50, alpha=0.5)"``; errors carry a caret."""

from __future__ import annotations

import dataclasses

from sparsec.dsl.spec import _describe, _tokenize
from sparsec.errors import SpecError
from sparsec.policies.base import POLICIES, Policy


def parse_policy(policy: str | Policy) -> Policy:
    """Parse a policy string (or pass a policy value through)."""
    if isinstance(policy, Policy):
        return policy
    if not isinstance(policy, str):
        raise SpecError(
            f"a policy is a string such as 'rigl(delta_t=50)' or a value such as sparsec.rigl, not {policy!r}"
        )
    toks = _tokenize(policy)
    first = toks[0]
    if first.kind != "word" or first.text.lower() not in POLICIES:
        raise SpecError(f"unknown policy {_describe(first)}; choose one of {', '.join(POLICIES)}", policy, first.col)
    base = POLICIES[first.text.lower()]
    params: dict[str, int | float | bool | str] = {}
    i = 1
    if toks[i].text == "(":
        i += 1
        while toks[i].text != ")":
            key, eq, val = (toks[min(j, len(toks) - 1)] for j in (i, i + 1, i + 2))
            if key.kind != "word":
                raise SpecError(f"expected a parameter name but found {_describe(key)}", policy, key.col)
            known = [f.name for f in dataclasses.fields(base)]
            if key.text not in known:
                raise SpecError(
                    f"policy {base.name!r} has no parameter {key.text!r}; its parameters are {known or 'none'}",
                    policy,
                    key.col,
                )
            if eq.text != "=":
                raise SpecError(f"expected '=' after {key.text} but found {_describe(eq)}", policy, eq.col)
            if val.kind not in ("num", "word"):
                raise SpecError(
                    f"expected a number or a word for {key.text} but found {_describe(val)}", policy, val.col
                )
            if val.kind == "word":
                params[key.text] = {"true": True, "false": False}.get(val.text.lower(), val.text)
            else:
                params[key.text] = int(val.text) if val.text.isdigit() else float(val.text)
            i = min(i + 3, len(toks) - 1)
            if toks[i].text == ",":
                i += 1
            elif toks[i].text != ")":
                raise SpecError(f"expected ',' or ')' but found {_describe(toks[i])}", policy, toks[i].col)
        i += 1
    if toks[i].kind != "end":
        raise SpecError(f"unexpected {_describe(toks[i])} after the policy", policy, toks[i].col)
    try:
        return base(**params)
    except SpecError as e:
        raise SpecError(e.message, policy, first.col) from None
