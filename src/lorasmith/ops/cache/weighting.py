"""Weighted captions: sd-scripts' attention syntax and the per-token weights it gives (torch-free).

sd-scripts' ``--weighted_captions`` reads the attention syntax of the A1111 web UI (``TokenizeStrategy.
_get_weighted_input_ids`` in ``library/strategy_base.py``; the same parser as ``parse_prompt_attention``
in ``library/custom_train_functions.py``):

- ``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` by ``1 / 1.1``; brackets nest and the
  factors multiply;
- ``(text:1.3)`` multiplies it by 1.3 (any ``[+-]?[.0-9]+`` number before the closing bracket);
- ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are the literal characters; a backslash before anything
  else is dropped;
- a bracket never closed still applies to everything after it; a closing bracket without an opening one,
  and a ``:1.3)`` outside round brackets, are plain text;
- neighbouring pieces of equal weight are joined again into one piece.

Each piece is then tokenized on its own (without BOS/EOS) and every token takes its piece's weight; the
tokens are cut at the caption length and framed as BOS, tokens, EOS, padding, with weight 1 on BOS, EOS and
the padding (:func:`weighted_token_ids`). Weights are multiplied in the same order as sd-scripts multiplies
them, so that equal weights compare equal and pieces join exactly as there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["ROUND_FACTOR", "SQUARE_FACTOR", "parse_attention", "weighted_token_ids"]

#: ``(text)``: weight times 1.1.
ROUND_FACTOR = 1.1
#: ``[text]``: weight divided by 1.1 (multiplied by the float ``1 / 1.1``, as sd-scripts does).
SQUARE_FACTOR = 1 / 1.1

_SPECIAL = "\\()[]:"
_ESCAPABLE = "()[]\\"


def _number_end(text: str, start: int) -> int:
    """End of a ``[+-]?[.0-9]+`` run at ``start`` followed by ``)`` (index of the ``)``), or -1."""
    i = start
    if i < len(text) and text[i] in "+-":
        i += 1
    digits = i
    # Python's \d is any Unicode decimal digit, which float() also reads
    while i < len(text) and (text[i] == "." or text[i].isdecimal()):
        i += 1
    if i == digits or i >= len(text) or text[i] != ")":
        return -1
    return i


def parse_attention(text: str) -> list[tuple[str, float]]:
    """``text`` as ``(piece, weight)`` pairs under sd-scripts' attention syntax.

    ``"a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."`` gives ``a `` 1.0, ``house`` 1.573..., `` ``
    1.1, ``on`` 1.0, `` a `` 1.1, ``hill`` 0.55, ``, sun, `` 1.1, ``sky`` 1.4641..., ``.`` 1.1. An empty
    text gives ``[("", 1.0)]``.

    :raises ValueError: a weight inside round brackets that is not a number (``(a:1.2.3)``); sd-scripts
        stops the whole run on it.
    """
    texts: list[str] = []
    weights: list[float] = []
    rounds: list[int] = []  # where each open bracket starts: the number of pieces before it
    squares: list[int] = []

    def add(piece: str) -> None:
        texts.append(piece)
        weights.append(1.0)

    def scale(start: int, factor: float) -> None:
        # one multiplication per closing bracket, in order: the same floats as sd-scripts
        for k in range(start, len(weights)):
            weights[k] *= factor

    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            nxt = text[i + 1] if i + 1 < len(text) else ""
            if nxt and nxt in _ESCAPABLE:
                add(nxt)
                i += 2
            else:
                # a lone backslash is a piece of its own, empty, which still parts two runs of equal weight
                add("")
                i += 1
        elif ch == "(":
            rounds.append(len(texts))
            i += 1
        elif ch == "[":
            squares.append(len(texts))
            i += 1
        elif ch == ":":
            end = _number_end(text, i + 1)
            if end < 0:
                add(":")
                i += 1
            elif rounds:
                number = text[i + 1 : end]
                try:
                    factor = float(number)
                except ValueError:
                    raise ValueError(f"weight {number!r} in {text[i : end + 1]!r} is not a number") from None
                scale(rounds.pop(), factor)
                i = end + 1
            else:
                add(text[i : end + 1])
                i = end + 1
        elif ch == ")" and rounds:
            scale(rounds.pop(), ROUND_FACTOR)
            i += 1
        elif ch == "]" and squares:
            scale(squares.pop(), SQUARE_FACTOR)
            i += 1
        elif ch in ")]":
            add(ch)
            i += 1
        else:
            j = i + 1
            while j < len(text) and text[j] not in _SPECIAL:
                j += 1
            add(text[i:j])
            i = j
    # brackets left open apply to the end, round ones first, each in the order it was opened
    for start in rounds:
        scale(start, ROUND_FACTOR)
    for start in squares:
        scale(start, SQUARE_FACTOR)
    merged: list[tuple[str, float]] = []
    for piece, weight in zip(texts, weights, strict=True):
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece, weight)
        else:
            merged.append((piece, weight))
    return merged or [("", 1.0)]


def weighted_token_ids(
    caption: str,
    tokenize: Callable[[list[str]], Sequence[Sequence[int]]],
    length: int,
    bos: int,
    eos: int,
    pad: int,
) -> tuple[list[int], list[float]]:
    """Token ids and per-token weights of a weighted caption, ``length`` long (BOS and EOS included).

    ``tokenize`` turns pieces of text into their token ids without BOS/EOS. The tokens of every piece of
    :func:`parse_attention` are concatenated, cut at ``length - 2``, and framed as BOS, tokens, EOS, then
    ``pad`` up to ``length``; the weights are 1 on BOS, EOS and the padding.

    :raises ValueError: as :func:`parse_attention`.
    """
    parts = parse_attention(caption)
    ids: list[int] = []
    weights: list[float] = []
    for (_, weight), part_ids in zip(parts, tokenize([p for p, _ in parts]), strict=True):
        ids.extend(int(t) for t in part_ids)
        weights.extend([weight] * len(part_ids))
    body = length - 2
    ids, weights = ids[:body], weights[:body]
    padding = body - len(ids)
    return [bos, *ids, eos] + [pad] * padding, [1.0, *weights, 1.0] + [1.0] * padding
