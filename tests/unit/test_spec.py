import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsec
from sparsec import NM, Block, Dense, FanIn, ShapeError, SpecError, Unstructured, parse_spec
from sparsec.formats import check_layer

VALID = {
    "dense": Dense(),
    "DENSE": Dense(),
    "2:4": NM(2, 4),
    " 1 : 8 ": NM(1, 8),
    "90%": Unstructured(0.9),
    "0.9": Unstructured(0.9),
    "0": Unstructured(0.0),
    "unstructured(50%)": Unstructured(0.5),
    "unstructured( .25 )": Unstructured(0.25),
    "block(32x32, 90%)": Block(32, 32, 0.9),
    "block(4 x 8,0.5)": Block(4, 8, 0.5),
    "fanin(k=64)": FanIn(k=64),
    "fanin(90%)": FanIn(sparsity=0.9),
    "1e-1": Unstructured(0.1),
}


@pytest.mark.parametrize("text,expected", VALID.items())
def test_parses(text, expected):
    assert parse_spec(text) == expected


@pytest.mark.parametrize("spec", list(VALID.values()) + [Unstructured(1 / 3), Block(3, 5, 0.123456789), FanIn(0.3)])
def test_round_trip(spec):
    assert parse_spec(str(spec)) == spec
    assert parse_spec(spec) is spec


# (text, start of the message, caret column)
ERRORS = [
    ("4:2", "N must be smaller than M", 0),
    ("2:2", "N must be smaller than M", 0),
    ("0:4", "N=0 must be an integer of at least 1", 0),
    ("1:0", "M=0 must be an integer of at least 1", 2),
    ("1.5:4", "N must be a positive integer", 0),
    ("2:4.0", "M must be a positive integer", 2),
    ("100%", "sparsity 1.0 is outside [0, 1)", 0),
    ("1.5", "sparsity 1.5 is outside [0, 1)", 0),
    ("unstructured(120%)", "sparsity 1.2 is outside [0, 1)", 13),
    ("block(0x4, 50%)", "block side rows=0", 6),
    ("block(4x0, 50%)", "block side cols=0", 8),
    ("block(4y4, 50%)", "expected 'x' between block sides", 7),
    ("block(4x4 50%)", "expected ',' after the block size", 10),
    ("fanin(k=0)", "fan-in k=0 must be", 8),
    ("fanin(k=)", "expected k (an integer)", 8),
    ("fanin(1.0)", "sparsity 1.0 is outside", 6),
    ("sparse(90%)", "unknown spec word 'sparse'", 0),
    ("2:4 extra", "unexpected 'extra' after the end of the spec", 4),
    ("90%)", "unexpected ')' after the end", 3),
    ("", "empty spec", 0),
    ("   ", "empty spec", 3),
    ("2:4;", "unexpected character ';'", 3),
    ("unstructured 0.5", "expected '(' after unstructured", 13),
    ("fanin(k=4", "expected ')'", 9),
    ("-2:4", "N must be a positive integer, not -2", 0),
]


@pytest.mark.parametrize("text,message,column", ERRORS)
def test_errors_point_at_the_bad_token(text, message, column):
    with pytest.raises(SpecError) as info:
        parse_spec(text)
    err = info.value
    assert err.message.startswith(message), err.message
    assert err.column == column
    lines = str(err).splitlines()
    assert lines[0] == err.message
    assert lines[1] == f"  {text}"
    assert lines[2] == "  " + " " * column + "^"


def test_design_md_example_renders_exactly():
    with pytest.raises(SpecError) as info:
        parse_spec("4:2")
    assert str(info.value) == "N must be smaller than M in an N:M spec\n  4:2\n  ^"


def test_spec_values_validate_without_text():
    with pytest.raises(SpecError, match="N must be smaller than M"):
        NM(4, 2)
    with pytest.raises(SpecError, match="exactly one of"):
        FanIn(sparsity=0.5, k=3)
    with pytest.raises(SpecError, match="not 3"):
        parse_spec(3)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="0123456789.:%()xkK=, blockfanindensunstructured-e", max_size=24) | st.text(max_size=16))
def test_fuzz_only_spec_error_escapes(text):
    try:
        spec = parse_spec(text)
    except SpecError:
        return
    assert parse_spec(str(spec)) == spec


@pytest.mark.parametrize(
    "spec,out,inn,match",
    [
        (
            "2:16",
            8,
            1000,
            r"in_features=1000 is not divisible by M=16; pad .* choose M in \{2, 4, 5, 8, 10, 20, 25, 40\}",
        ),
        ("block(32x32, 90%)", 100, 64, r"block 32x32 does not tile the weight.*out_features=100"),
        ("fanin(k=100)", 10, 64, r"fan-in k=100 is larger than in_features=64; choose k <= 64"),
    ],
)
def test_layer_checks_name_layer_rule_and_fix(spec, out, inn, match):
    with pytest.raises(ShapeError, match=match) as info:
        check_layer(parse_spec(spec), out, inn, "encoder.fc1")
    assert "encoder.fc1" in str(info.value)


def test_layer_check_error_from_the_public_api():
    with pytest.raises(ShapeError, match="fc"):
        sparsec.SparseLinear(30, 8, spec="2:4", name="fc")


def test_a_second_policy_with_a_taken_name_is_an_error():
    from dataclasses import dataclass

    from sparsec.spec import Policy

    with pytest.raises(SpecError, match="a policy named 'rigl' exists already"):

        @dataclass(frozen=True)
        class MyRigL(Policy):
            name = "rigl"


@pytest.mark.parametrize(
    "text,message",
    [
        ("rigl(delta_t=-1)", "delta_t=-1.0 must be an integer of at least 1"),
        ("rigl(alpha=-0.5)", "alpha=-0.5 must be in \\[0, 1\\]"),
        ("srigl(gamma_sal=-1)", "gamma_sal=-1.0 must be a number >= 0"),
    ],
)
def test_a_negative_policy_parameter_gets_its_range_not_a_syntax_error(text, message):
    with pytest.raises(sparsec.SpecError, match=message):
        sparsec.parse_policy(text)


@pytest.mark.parametrize(
    "text,message",
    [("-10%", "sparsity -0.1 is outside \\[0, 1\\)"), ("fanin(k=-3)", "k must be a positive integer, not -3")],
)
def test_a_negative_spec_number_gets_its_range(text, message):
    with pytest.raises(sparsec.SpecError, match=message):
        sparsec.parse_spec(text)


def test_specs_are_shown_rounded_to_people_and_kept_exact_for_keys():
    spec = parse_spec("unstructured(0.7266162109375001)")
    assert sparsec.describe_spec(spec) == "unstructured(72.66%)"
    assert str(spec) == "unstructured(0.7266162109375001)"  # the canonical text: layout keys, checkpoints
    assert sparsec.describe_spec(parse_spec("block(4x8, 0.9)")) == "block(4x8, 90%)"
    assert sparsec.describe_spec(parse_spec("fanin(k=4)")) == "fanin(k=4)"
    assert "spec=unstructured(72.66%)" in repr(sparsec.SparseLinear(10, 10, spec=spec))
