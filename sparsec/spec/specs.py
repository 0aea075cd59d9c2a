"""The sparsity spec language: frozen spec values, the string grammar, and checks against a layer.

Grammar (see README)::

    spec      := "dense"
               | INT ":" INT                              N:M along the input dim      "2:4"
               | sparsity | "unstructured(" sparsity ")"  fraction of zeros            "90%"
               | "block(" INT "x" INT "," sparsity ")"    whole rows x cols tiles      "block(32x32, 90%)"
               | "fanin(" (sparsity | "k=" INT) ")"        same inputs per output       "fanin(k=64)"
    sparsity  := FLOAT in [0, 1) | NUMBER "%"

``str(spec)`` is canonical and parses back to an equal spec.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import ClassVar

from sparsec.errors import SpecError

# --- spec values --------------------------------------------------------------------------------


def _sparsity_problem(s: float) -> str | None:
    if not (isinstance(s, (int, float)) and math.isfinite(s) and 0.0 <= s < 1.0):
        return f"sparsity {s!r} is outside [0, 1); write a fraction such as 0.9 or a percentage such as 90%"
    return None


class _SpecBase:
    """Shared behaviour: validation in ``__post_init__`` through ``problem()``."""

    def problem(self) -> tuple[str, str] | None:  # (field, message)
        return None

    def __post_init__(self) -> None:
        found = self.problem()
        if found is not None:
            error = SpecError(found[1])
            error.field = found[0]  # lets the parser put the caret under the right token
            raise error

    @property
    def has_free_sparsity(self) -> bool:
        """Whether a layer distribution (uniform, ERK) may set this spec's sparsity per layer."""
        return "sparsity" in {f.name for f in fields(self)} and self.sparsity is not None


@dataclass(frozen=True)
class Dense(_SpecBase):
    """No sparsity: the layer stays an ordinary dense layer."""

    def __str__(self) -> str:
        return "dense"


@dataclass(frozen=True)
class Unstructured(_SpecBase):
    """Any ``n - floor(sparsity * n)`` weights of the layer are kept."""

    sparsity: float

    def problem(self):
        msg = _sparsity_problem(self.sparsity)
        return ("sparsity", msg) if msg else None

    def __str__(self) -> str:
        return f"unstructured({float(self.sparsity)!r})"


@dataclass(frozen=True)
class NM(_SpecBase):
    """Exactly ``n`` of every ``m`` consecutive inputs of each output are kept."""

    n: int
    m: int

    def problem(self):
        if not isinstance(self.n, int) or self.n < 1:
            return ("n", f"N={self.n!r} must be an integer of at least 1 in an N:M spec")
        if not isinstance(self.m, int) or self.m < 1:
            return ("m", f"M={self.m!r} must be an integer of at least 1 in an N:M spec")
        if self.n >= self.m:
            return ("n", "N must be smaller than M in an N:M spec")
        return None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


@dataclass(frozen=True)
class Block(_SpecBase):
    """Whole ``rows x cols`` tiles of the weight are kept or zero."""

    rows: int
    cols: int
    sparsity: float

    def problem(self):
        for name in ("rows", "cols"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                return (name, f"block side {name}={v!r} must be an integer of at least 1")
        msg = _sparsity_problem(self.sparsity)
        return ("sparsity", msg) if msg else None

    def __str__(self) -> str:
        return f"block({self.rows}x{self.cols}, {float(self.sparsity)!r})"


@dataclass(frozen=True)
class FanIn(_SpecBase):
    """Every output keeps the same number of inputs: ``k`` given, or set by a sparsity."""

    sparsity: float | None = None
    k: int | None = None

    def problem(self):
        if (self.sparsity is None) == (self.k is None):
            return ("k", "a fan-in spec takes exactly one of a sparsity or k=INT")
        if self.k is not None and (not isinstance(self.k, int) or self.k < 1):
            return ("k", f"fan-in k={self.k!r} must be an integer of at least 1")
        if self.sparsity is not None:
            msg = _sparsity_problem(self.sparsity)
            return ("sparsity", msg) if msg else None
        return None

    def __str__(self) -> str:
        inner = f"k={self.k}" if self.k is not None else repr(float(self.sparsity))
        return f"fanin({inner})"


Spec = Dense | Unstructured | NM | Block | FanIn
SPEC_TYPES: tuple[type, ...] = (Dense, Unstructured, NM, Block, FanIn)


def describe_spec(spec: Spec) -> str:
    """``spec`` for people: sparsities as percentages of four significant digits (``unstructured(72.66%)``).
    Still valid spec text, but rounded: ``str(spec)`` is the exact, canonical form (keys, checkpoints)."""
    return re.sub(r"\b\d+\.\d+(?:[eE]-?\d+)?\b", lambda m: f"{float(m.group()) * 100:.4g}%", str(spec))


def unstructured_with(n: int, kept: int) -> Unstructured:
    """The unstructured spec whose layout keeps exactly ``kept`` of ``n`` (``n - floor(s n) == kept``)."""
    s = (n - kept) / n
    while n - math.floor(s * n) > kept:
        s = math.nextafter(s, 1.0)
    while s > 0 and n - math.floor(s * n) < kept:
        s = math.nextafter(s, 0.0)
    return Unstructured(s)


# --- the parser ---------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"(?P<ws>\s+)"
    r"|(?P<num>-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)"  # a sign, so a range check can name the value
    r"|(?P<word>[A-Za-z_]+)"
    r"|(?P<punct>[():,%=])"
)


@dataclass(frozen=True)
class _Tok:
    kind: str  # "num" | "word" | "punct" | "end"
    text: str
    col: int


def tokenize(text: str) -> list[_Tok]:
    toks, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise SpecError(f"unexpected character {text[pos]!r} in spec", text, pos)
        if m.lastgroup != "ws":
            toks.append(_Tok(m.lastgroup, m.group(), pos))
        pos = m.end()
    toks.append(_Tok("end", "", len(text)))
    return toks


def describe_token(tok: _Tok) -> str:
    return "the end of the text" if tok.kind == "end" else repr(tok.text)


_EXPECTED = "dense, N:M (2:4), a sparsity (90% or 0.9), unstructured(...), block(RxC, ...) or fanin(...)"


class _Parser:
    WORDS: ClassVar[tuple[str, ...]] = ("dense", "unstructured", "block", "fanin")

    def __init__(self, text: str):
        self.text = text
        self.toks = tokenize(text)
        self.i = 0

    # token helpers
    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        tok = self.toks[self.i]
        self.i = min(self.i + 1, len(self.toks) - 1)
        return tok

    def fail(self, message: str, tok: _Tok) -> SpecError:
        return SpecError(message, self.text, tok.col)

    def expect(self, text: str, what: str) -> _Tok:
        tok = self.take()
        if tok.text.lower() != text:
            raise self.fail(f"expected {what} but found {describe_token(tok)}", tok)
        return tok

    def integer(self, what: str) -> tuple[int, _Tok]:
        tok = self.take()
        if tok.kind != "num":
            raise self.fail(f"expected {what} (an integer) but found {describe_token(tok)}", tok)
        if not tok.text.isdigit():
            raise self.fail(f"{what} must be a positive integer, not {tok.text}", tok)
        return int(tok.text), tok

    def sparsity(self) -> tuple[float, _Tok]:
        tok = self.take()
        if tok.kind != "num":
            raise self.fail(f"expected a sparsity (0.9 or 90%) but found {describe_token(tok)}", tok)
        value = float(tok.text)
        if self.peek().text == "%":
            self.take()
            value = value / 100.0
        return value, tok

    def build(self, cls, carets: dict[str, _Tok], **kwargs):
        """Construct a spec, turning a validation problem into an error with a caret."""
        try:
            return cls(**kwargs)
        except SpecError as e:
            raise self.fail(e.message, carets.get(getattr(e, "field", ""), self.toks[0])) from None

    # grammar
    def spec(self) -> Spec:
        tok = self.peek()
        if tok.kind == "end":
            raise self.fail(f"empty spec; expected {_EXPECTED}", tok)
        if tok.kind == "num":
            return self.number_spec()
        if tok.kind != "word":
            raise self.fail(f"unexpected {tok.text!r}; expected {_EXPECTED}", tok)
        word = tok.text.lower()
        if word not in self.WORDS:
            raise self.fail(f"unknown spec word {tok.text!r}; expected {_EXPECTED}", tok)
        self.take()
        if word == "dense":
            return Dense()
        self.expect("(", f"'(' after {word}")
        if word == "unstructured":
            s, stok = self.sparsity()
            result = self.build(Unstructured, {"sparsity": stok}, sparsity=s)
        elif word == "block":
            r, rtok = self.integer("the block height")
            xtok = self.take()
            if xtok.text.lower() != "x":
                raise self.fail(
                    f"expected 'x' between block sides, as in block(32x32, 90%), found {describe_token(xtok)}",
                    xtok,
                )
            c, ctok = self.integer("the block width")
            self.expect(",", "',' after the block size")
            s, stok = self.sparsity()
            result = self.build(Block, {"rows": rtok, "cols": ctok, "sparsity": stok}, rows=r, cols=c, sparsity=s)
        else:  # fanin
            if self.peek().text.lower() == "k":
                self.take()
                self.expect("=", "'=' after k")
                k, ktok = self.integer("k")
                result = self.build(FanIn, {"k": ktok}, k=k)
            else:
                s, stok = self.sparsity()
                result = self.build(FanIn, {"sparsity": stok}, sparsity=s)
        self.expect(")", "')'")
        return result

    def number_spec(self) -> Spec:
        first = self.peek()
        if self.toks[self.i + 1].text == ":":
            n, ntok = self.integer("N")
            self.take()  # ':'
            m, mtok = self.integer("M")
            return self.build(NM, {"n": ntok, "m": mtok}, n=n, m=m)
        s, stok = self.sparsity()
        assert stok is first
        return self.build(Unstructured, {"sparsity": stok}, sparsity=s)

    def parse(self) -> Spec:
        result = self.spec()
        tail = self.peek()
        if tail.kind != "end":
            raise self.fail(f"unexpected {tail.text!r} after the end of the spec {str(result)!r}", tail)
        return result


def parse_spec(spec: str | Spec) -> Spec:
    """Parse a spec string (or pass a spec value through). Raises ``SpecError`` with a caret."""
    if isinstance(spec, SPEC_TYPES):
        return spec
    if not isinstance(spec, str):
        raise SpecError(f"a spec is a string such as '2:4' or a spec value such as NM(2, 4), not {spec!r}")
    return _Parser(spec).parse()
