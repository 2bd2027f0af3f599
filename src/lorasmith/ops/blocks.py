"""Block weights: parse ``--blocks`` in a family's notations, presets, and the weight of a canonical key.

Torch-free and reusable by every op that scales per block (merge today). A :class:`BlockWeights` maps the
block labels of one notation of a family (``arch.block_notations()``, e.g. ``sdxl-12``) to a weight; a
canonical key's weight is the weight of ``arch.block_of(key)``. Labels the notation does not list (the
17-value SD1 notation has no ``IN00``) and keys without a block keep weight 1: a notation only changes
what it names.

Accepted spellings of a spec:

- a comma-separated list of numbers whose count is the length of one of the family's notations
  (``"1,0,0,0,1,1,1,1,1,1,1,1"`` for ``sdxl-12``);
- ``LABEL=value`` pairs (``"BASE=0,IN04=0.5,MID=1"``); unnamed labels stay 1. ``MID`` is accepted for ``M00``;
- a preset name (see :data:`PRESETS`), optionally ``PRESET:notation`` to choose the notation.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lorasmith.archs.base import Architecture
from lorasmith.errors import LorasmithError

__all__ = ["PRESETS", "BlockWeightError", "BlockWeights", "parse_blocks", "preset_values"]

#: Labels that stand for text encoders in the notations (``BASE`` in the LoRA Block Weight extension).
_BASE_LABELS = frozenset({"BASE", "CLIP", "T5", "TE", "TE1", "TE2", "TE3"})
_IN = re.compile(r"^IN\d+$")
_OUT = re.compile(r"^OUT\d+$")
_MID = frozenset({"M00", "MID"})

#: Preset names and what they enable (value 1; everything else 0). "Shallow"/"deep" split the input and
#: output block lists in halves (the input half nearer the image is shallow; for the output blocks, the
#: first half is deep).
PRESETS: dict[str, str] = {
    "NONE": "every block 0",
    "ALL": "every block 1",
    "INS": "text encoder + the shallow (first) half of the input blocks",
    "IND": "text encoder + the deep (second) half of the input blocks",
    "INALL": "text encoder + every input block",
    "MIDD": "text encoder + deep input blocks + middle block + deep output blocks",
    "OUTD": "text encoder + the deep (first) half of the output blocks",
    "OUTS": "text encoder + the shallow (second) half of the output blocks",
    "OUTALL": "text encoder + every output block",
}


class BlockWeightError(LorasmithError):
    """A block-weight spec that does not fit the family (exit code 1)."""


@dataclass(frozen=True)
class BlockWeights:
    """Per-block weights in one notation of a family.

    :ivar notation: the notation's name (``sdxl-12``).
    :ivar weights: label -> weight for every label of the notation.
    """

    notation: str
    weights: Mapping[str, float]

    def weight_of_label(self, label: str | None) -> float:
        """The weight of a block label (1 for ``None`` or a label the notation does not list)."""
        if label is None:
            return 1.0
        return float(self.weights.get(label, 1.0))

    def weight(self, arch: Architecture, key: str) -> float:
        """The weight of a canonical key of ``arch``."""
        return self.weight_of_label(arch.block_of(key))


def _halves(labels: Sequence[str]) -> tuple[list[str], list[str]]:
    mid = (len(labels) + 1) // 2
    return list(labels[:mid]), list(labels[mid:])


def preset_values(name: str, labels: Sequence[str]) -> dict[str, float]:
    """The weights of preset ``name`` over a notation's ``labels``.

    :raises BlockWeightError: unknown preset, or one that needs input/output blocks the notation lacks.
    """
    up = name.upper()
    if up not in PRESETS:
        raise BlockWeightError(f"unknown block-weight preset {name!r}", hint=f"presets: {', '.join(PRESETS)}")
    if up in ("ALL", "NONE"):
        return dict.fromkeys(labels, 1.0 if up == "ALL" else 0.0)
    ins = [x for x in labels if _IN.match(x)]
    outs = [x for x in labels if _OUT.match(x)]
    if not ins or not outs:
        raise BlockWeightError(
            f"preset {up} needs IN../OUT.. blocks, which this notation ({len(labels)} labels) lacks",
            hint="only ALL and NONE fit every family (the others need IN../OUT.. labels, as SD1 and SDXL "
            "have); or give a list of values or LABEL=value pairs",
        )
    in_shallow, in_deep = _halves(ins)
    out_deep, out_shallow = _halves(outs)
    mids = [x for x in labels if x in _MID]
    on: set[str] = {x for x in labels if x in _BASE_LABELS}
    on |= {
        "INS": set(in_shallow),
        "IND": set(in_deep),
        "INALL": set(ins),
        "MIDD": set(in_deep) | set(mids) | set(out_deep),
        "OUTD": set(out_deep),
        "OUTS": set(out_shallow),
        "OUTALL": set(outs),
    }[up]
    return {label: 1.0 if label in on else 0.0 for label in labels}


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BlockWeightError(
            f"block weight {what}: {text!r} is not a number", hint="write values like 1, 0.5 or -0.25"
        ) from None
    if not math.isfinite(value):
        raise BlockWeightError(
            f"block weight {what}: {text!r} is not finite", hint="write values like 1, 0.5 or -0.25"
        )
    return value


def parse_blocks(spec: str, arch: Architecture) -> BlockWeights:
    """Parse a ``--blocks`` spec for ``arch`` (see the module docstring).

    :raises BlockWeightError: a count no notation has, an unknown label or preset, a bad number.
    """
    notations = {name: list(labels) for name, labels in arch.block_notations().items()}
    if not notations:
        raise BlockWeightError(
            f"family {arch.id} has no block-weight notation", hint="merge without --blocks"
        )
    text = spec.strip()
    if not text:
        raise BlockWeightError("empty --blocks value", hint="give a preset, a list of values or LABEL=value")
    name, _, chosen = text.partition(":")
    if name.upper() in PRESETS:
        if chosen:
            if chosen not in notations:
                raise BlockWeightError(
                    f"unknown block notation {chosen!r} for {arch.id}",
                    hint=f"notations: {', '.join(notations)}",
                )
            notation = chosen
        else:
            notation = max(notations, key=lambda n: len(notations[n]))
        return BlockWeights(notation, preset_values(name, notations[notation]))
    parts = [p.strip() for p in text.split(",")]
    if any("=" in p for p in parts):
        every = {label for labels in notations.values() for label in labels}
        weights: dict[str, float] = {}
        for part in parts:
            label, eq, value = part.partition("=")
            label = label.strip().upper()
            if label == "MID":
                label = "M00"
            if not eq or label not in every:
                raise BlockWeightError(
                    f"unknown block label {label or part!r} for {arch.id}",
                    hint=f"labels: {', '.join(sorted(every))}",
                )
            if label in weights:
                raise BlockWeightError(
                    f"block label {label} given twice in {text!r}", hint="give each label once"
                )
            weights[label] = _number(value.strip(), label)
        notation = max(notations, key=lambda n: len(notations[n]))
        full = {label: weights.get(label, 1.0) for label in notations[notation]}
        full.update(weights)
        return BlockWeights(notation, full)
    counts = {len(labels): n for n, labels in notations.items()}
    if len(parts) not in counts:
        if len(parts) == 1 and not re.match(r"^[-+0-9.eE]+$", parts[0]):
            raise BlockWeightError(
                f"unknown block-weight preset {parts[0]!r}", hint=f"presets: {', '.join(PRESETS)}"
            )
        sizes = " or ".join(str(k) for k in sorted(counts))
        raise BlockWeightError(
            f"unknown block notation: {len(parts)} values given; {arch.id} takes {sizes}",
            hint=f"notations: {', '.join(f'{n} ({len(v)})' for n, v in notations.items())}",
        )
    notation = counts[len(parts)]
    labels = notations[notation]
    return BlockWeights(notation, {label: _number(p, label) for label, p in zip(labels, parts, strict=True)})
