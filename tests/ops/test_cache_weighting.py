"""sd-scripts' attention syntax for weighted captions: the parser and the token weights (no torch).

The references are written from the rule: ``(x)`` multiplies by 1.1, ``[x]`` by ``1 / 1.1``, ``(x:w)`` by
``w``, escapes are literal, a lone backslash is dropped, brackets left open apply to the end, equal
neighbours join.
"""

from __future__ import annotations

import pytest

from lorasmith.ops.cache.weighting import parse_attention, weighted_token_ids

UP = 1.1
DOWN = 1 / 1.1


# --------------------------------------------------------------------------------------------- parser
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", UP), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", UP)]),
        ("[down] up", [("down", DOWN), (" up", 1.0)]),
        ("[[twice]]", [("twice", DOWN * DOWN)]),
        ("((nested) outer)", [("nested", 1.0 * UP * UP), (" outer", UP)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", UP)]),  # equal neighbours join
        ("(a:1.5) b", [("a", 1.5), (" b", 1.0)]),
        ("(a:+.5)", [("a", 0.5)]),
        ("(a:-1)", [("a", -1.0)]),
        ("((a:2))", [("a", 2.0 * UP)]),
        ("x :1.5) y", [("x :1.5) y", 1.0)]),  # a weight outside round brackets is text
        ("a) b] c:d", [("a) b] c:d", 1.0)]),  # unmatched closers and colons are text
        ("(a: 2)", [("a: 2", UP)]),  # not a weight: the colon and the rest are text, then ")" closes
        ("[a:2)]", [("a:2)", DOWN)]),  # ":2)" needs an open round bracket
        (r"\(literal\]", [("(literal]", 1.0)]),
        (r"(a \(b\))", [("a (b)", UP)]),
        ("a\\\\b", [("a\\b", 1.0)]),  # an escaped backslash
        ("a\\b", [("ab", 1.0)]),  # a lone backslash is dropped
        ("(a:\u0663)", [("a", 3.0)]),  # any Unicode decimal digit, as Python's \d and float() read it
        ("", [("", 1.0)]),
        ("()", [("", 1.0)]),
    ],
)
def test_parse_attention(text: str, expected: list[tuple[str, float]]) -> None:
    assert parse_attention(text) == expected


def test_parse_attention_multiplies_in_sd_scripts_order() -> None:
    got = parse_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    # each closing bracket multiplies once, innermost first: the floats (and so the joins) are exact
    assert got == [
        ("a ", 1.0),
        ("house", 1.0 * 1.3 * UP * UP),
        (" ", UP),
        ("on", 1.0 * UP * DOWN),
        (" a ", UP),
        ("hill", 1.0 * 0.5 * UP),
        (", sun, ", UP),
        ("sky", 1.0 * UP * UP * UP * UP),
        (".", UP),
    ]
    assert got[1][1] == 1.5730000000000004 and got[7][1] == 1.4641000000000006
    # "on": 1.1 then 1/1.1 is exactly 1.0 in floats, which is why it shows as 1.0 in sd-scripts' doc
    assert got[3][1] == 1.0


def test_parse_attention_refuses_a_weight_that_is_no_number() -> None:
    with pytest.raises(ValueError, match=r"weight '1\.2\.3' in ':1\.2\.3\)' is not a number"):
        parse_attention("(a:1.2.3)")
    with pytest.raises(ValueError, match="not a number"):
        parse_attention("(a:.)")
    # outside round brackets the same text is not a weight, and not an error
    assert parse_attention("a:1.2.3)") == [("a:1.2.3)", 1.0)]


def _chars(pieces: list[str]) -> list[list[int]]:
    """A toy tokenizer: one id per letter (a=1, b=2, ...), spaces dropped."""
    return [[ord(c) - 96 for c in p if c != " "] for p in pieces]


def test_weighted_token_ids_frame_and_cut() -> None:
    ids, weights = weighted_token_ids("a (bc:2) [d]", _chars, 10, bos=90, eos=91, pad=0)
    assert ids == [90, 1, 2, 3, 4, 91, 0, 0, 0, 0]
    assert weights == [1.0, 1.0, 2.0, 2.0, DOWN, 1.0, 1.0, 1.0, 1.0, 1.0]
    # cut at length - 2 tokens: the EOS stays, the weights follow the tokens kept
    ids, weights = weighted_token_ids("ab (cdef:3)", _chars, 5, bos=90, eos=91, pad=91)
    assert ids == [90, 1, 2, 3, 91] and weights == [1.0, 1.0, 1.0, 3.0, 1.0]
