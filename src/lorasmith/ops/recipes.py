"""Merge recipes: the arguments of :func:`lorasmith.ops.merge.merge` read from a YAML file.

Torch-free. A recipe is a YAML mapping whose keys are the options of ``lorasmith merge`` (``save_dtype`` or
``save-dtype``; ``lambda`` for ``--lambda``); inputs are lists whose items are ``FILE[:RATIO]`` strings or
``{path: FILE, ratio: R}`` mappings. Relative paths are relative to the recipe's folder, so a recipe and
its files can move together. See ``docs/merge.md`` for examples.

Validation is pydantic's; every problem becomes one line ``FILE: FIELD: what is wrong`` (``FIELD`` as
``loras[1].ratio``) in one :class:`RecipeError` (exit code 1).

A bake recipe may also name text encoders kept in separate files, as ``merge --base`` takes them:
``clip_l``/``clip_l_out``, ``clip_g``/``clip_g_out``, ``t5xxl``/``t5xxl_out``,
``text_encoder``/``text_encoder_out`` (each input with its output); :func:`run_recipe` then bakes through
:func:`lorasmith.ops.components.bake_parts`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from lorasmith.errors import EXIT_USAGE, EXIT_USER, InvalidFileError, LorasmithError, UsageError
from lorasmith.progress import ProgressCallback

if TYPE_CHECKING:
    from lorasmith.ops.components import ComponentsResult
    from lorasmith.ops.merge import MergeResult

__all__ = [
    "PART_FIELDS",
    "MergeRecipe",
    "RecipeError",
    "RecipeInput",
    "load_recipe",
    "recipe_arguments",
    "recipe_parts",
    "run_recipe",
]

#: Separate text-encoder files a bake recipe may name: field -> its output field (``merge --clip-l F
#: --clip-l-out O``).
PART_FIELDS: dict[str, str] = {
    "clip_l": "clip_l_out",
    "clip_g": "clip_g_out",
    "t5xxl": "t5xxl_out",
    "text_encoder": "text_encoder_out",
}


class RecipeError(LorasmithError):
    """A recipe that is not valid YAML or does not validate (exit code 1).

    :ivar problems: one ``FILE: FIELD: problem`` line per problem; the message holds them all, one per
        printed ``error:`` line.
    """

    def __init__(self, problems: Sequence[str], hint: str | None = None) -> None:
        self.problems = list(problems)
        # report_error prints "error: <message>"; continuation lines get their own "error:" prefix so
        # that each field's problem is one complete line
        super().__init__("\nerror: ".join(self.problems), hint=hint)


def _no_bool(value: Any) -> Any:
    """YAML ``true``/``false`` where a number is expected is a mistake, not 1 or 0."""
    if isinstance(value, bool):
        raise ValueError("Input should be a valid number, not true or false")
    return value


Number = Annotated[float, BeforeValidator(_no_bool)]
Integer = Annotated[int, BeforeValidator(_no_bool)]

#: ``dynamic`` methods (``METHOD:VALUE``) of the SVD merge.
DYNAMIC_METHODS: tuple[str, ...] = ("sv_ratio", "sv_fro", "sv_cumulative", "energy")


class RecipeInput(BaseModel):
    """One input file of a recipe and its ratio (``None``: the mode's default)."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1)
    ratio: Number | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        """``"a.safetensors:0.7"`` -> ``{"path": "a.safetensors", "ratio": 0.7}``."""
        if isinstance(value, str):
            head, sep, tail = value.rpartition(":")
            if sep and head:
                try:
                    return {"path": head, "ratio": float(tail)}
                except ValueError:
                    pass
            return {"path": value}
        return value

    @field_validator("ratio")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("the ratio must be a finite number")
        return value


BlocksValue = str | list[float] | dict[str, float]


class MergeRecipe(BaseModel):
    """A validated merge recipe (field names are :func:`~lorasmith.ops.merge.merge`'s parameters).

    Exactly one mode: ``loras`` alone (LoRA merge), ``base`` + ``loras`` (bake) or ``models`` (checkpoint
    merge). ``blocks`` is the ``--blocks`` text, a list of numbers, or a ``{LABEL: value}`` mapping.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    output: str | None = Field(None, min_length=1)
    loras: list[RecipeInput] = Field(default_factory=list)
    base: str | None = Field(None, min_length=1)
    models: list[RecipeInput] = Field(default_factory=list)
    method: Literal["weighted-sum", "add-difference", "ties", "dare"] = "weighted-sum"
    rank: Integer | None = Field(None, ge=1)
    dynamic: str | None = None
    to: str | None = None
    blocks: BlocksValue | None = None
    arch: str | None = None
    unet_only: bool = False
    density: Number = Field(0.2, gt=0.0, le=1.0)
    drop: Number = Field(0.9, ge=0.0, lt=1.0)
    lam: Number = Field(1.0, alias="lambda", allow_inf_nan=False)
    seed: Integer = 0
    precision: Literal["float32", "float64", "fp32", "fp64"] = "float32"
    save_dtype: (
        Literal["float32", "float16", "bfloat16", "float64", "fp32", "fp16", "bf16", "fp64"] | None
    ) = None
    strict: bool = False
    overwrite: bool = False
    clip_l: str | None = Field(None, min_length=1)
    clip_l_out: str | None = Field(None, min_length=1)
    clip_g: str | None = Field(None, min_length=1)
    clip_g_out: str | None = Field(None, min_length=1)
    t5xxl: str | None = Field(None, min_length=1)
    t5xxl_out: str | None = Field(None, min_length=1)
    text_encoder: str | None = Field(None, min_length=1)
    text_encoder_out: str | None = Field(None, min_length=1)
    #: the recipe file, for messages (set by :func:`load_recipe`)
    _source: str = PrivateAttr(default="recipe")

    @field_validator("dynamic")
    @classmethod
    def _dynamic(cls, value: str | None) -> str | None:
        """``METHOD:VALUE`` with a known method and a number (its range is checked by the merge)."""
        if value is None:
            return value
        method, sep, number = value.partition(":")
        if not sep or method not in DYNAMIC_METHODS:
            raise ValueError(
                f"write METHOD:VALUE with METHOD one of {', '.join(DYNAMIC_METHODS)} (sv_fro:0.9)"
            )
        try:
            v = float(number)
        except ValueError:
            raise ValueError(f"{number!r} is not a number") from None
        if not math.isfinite(v):
            raise ValueError(f"{number!r} is not a finite number")
        return value

    @model_validator(mode="after")
    def _one_mode(self) -> MergeRecipe:
        if self.models and (self.loras or self.base is not None):
            raise ValueError("give either models (checkpoint merge) or loras (with base to bake), not both")
        if self.base is not None and not self.loras:
            raise ValueError("base needs loras to bake into it")
        if not self.models and not self.loras:
            raise ValueError("nothing to merge: give loras (and base to bake them) or models")
        return self

    def part_problems(self) -> list[str]:
        """``FIELD: problem`` for each text-encoder part field that does not fit (an input without its
        output or the reverse, parts without ``base``); empty when they fit."""
        out: list[str] = []
        for name, out_name in PART_FIELDS.items():
            src, dst = getattr(self, name), getattr(self, out_name)
            if src is not None and dst is None:
                out.append(f"{out_name}: missing: the baked {name} needs an output file")
            elif dst is not None and src is None:
                out.append(f"{name}: missing: {out_name} needs the {name} file to bake")
            elif src is not None and self.base is None:
                out.append(f"{name}: separate text-encoder files are baked with base (and loras)")
        return out

    def has_parts(self) -> bool:
        """Whether the recipe names separate text-encoder files."""
        return any(getattr(self, n) is not None for n in (*PART_FIELDS, *PART_FIELDS.values()))

    def blocks_text(self) -> str | None:
        """``blocks`` as the ``--blocks`` text."""
        b = self.blocks
        if b is None or isinstance(b, str):
            return b
        if isinstance(b, list):
            return ",".join(f"{v:g}" for v in b)
        return ",".join(f"{k}={v:g}" for k, v in b.items())


def _field(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _problems(path: Path, exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors(include_url=False):
        msg = str(err["msg"])
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        lines.append(f"{path}: {_field(err['loc'])}: {msg}")
    return lines


def load_recipe(path: str | os.PathLike[str]) -> MergeRecipe:
    """Read and validate a recipe file.

    :raises InvalidFileError: the file cannot be read.
    :raises RecipeError: not YAML, not a mapping, or fields that do not validate (one line each).
    """
    import yaml  # type: ignore[import-untyped]

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidFileError(f"{p}: cannot read the recipe ({exc})", hint="check the path") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise RecipeError([f"{p}: {where}not valid YAML ({problem})"], hint="check the indentation") from None
    if data is None:
        raise RecipeError([f"{p}: the recipe is empty"], hint="see docs/merge.md for examples")
    if not isinstance(data, dict):
        raise RecipeError(
            [f"{p}: a recipe is a mapping of options, got {type(data).__name__}"],
            hint="see docs/merge.md for examples",
        )
    # option spellings of the command line (save-dtype, unet-only) are accepted as well
    fields = {(k.replace("-", "_") if isinstance(k, str) else k): v for k, v in data.items()}
    try:
        recipe = MergeRecipe.model_validate(fields)
    except ValidationError as exc:
        raise RecipeError(_problems(p, exc), hint="see docs/merge.md for the recipe fields") from None
    problems = recipe.part_problems()
    if problems:
        raise RecipeError(
            [f"{p}: {line}" for line in problems],
            hint="give each text-encoder file with its output (clip_l: F and clip_l_out: O) and a base",
        )
    recipe._source = str(p)
    return recipe


def _resolve(folder: Path, name: str) -> str:
    p = Path(os.path.expanduser(name))
    return str(p if p.is_absolute() else folder / p)


def _spec(folder: Path, item: RecipeInput) -> str:
    path = _resolve(folder, item.path)
    return path if item.ratio is None else f"{path}:{item.ratio!r}"


def recipe_arguments(
    recipe: MergeRecipe, folder: str | os.PathLike[str], output: str | None
) -> dict[str, Any]:
    """The keyword arguments of :func:`~lorasmith.ops.merge.merge` for ``recipe``.

    :param folder: relative paths are resolved against it (the recipe's folder).
    :param output: the output to use when the recipe has none.
    :raises RecipeError: neither the recipe nor ``output`` names an output; the recipe names separate
        text-encoder files, which :func:`~lorasmith.ops.merge.merge` does not take (use :func:`run_recipe`).
    """
    if recipe.has_parts():
        fields = [n for n in (*PART_FIELDS, *PART_FIELDS.values()) if getattr(recipe, n) is not None]
        raise RecipeError(
            [
                f"{recipe._source}: {fields[0]}: separate text-encoder files are baked by "
                "lorasmith.ops.recipes.run_recipe, not by merge() arguments"
            ],
            hint="meanwhile bake them with: lorasmith merge --base MODEL LORA --clip-l F --clip-l-out O ...",
        )
    return _merge_arguments(recipe, folder, output)


def _merge_arguments(
    recipe: MergeRecipe, folder: str | os.PathLike[str], output: str | None
) -> dict[str, Any]:
    base = Path(folder)
    out = _resolve(base, recipe.output) if recipe.output is not None else output
    if out is None:
        raise RecipeError(
            [f"{recipe._source}: output: missing"], hint="add output: FILE to the recipe, or give -o"
        )
    return {
        "loras": [_spec(base, x) for x in recipe.loras],
        "output": out,
        "base": _resolve(base, recipe.base) if recipe.base is not None else None,
        "models": [_spec(base, x) for x in recipe.models],
        "method": recipe.method,
        "rank": recipe.rank,
        "dynamic": recipe.dynamic,
        "to": recipe.to,
        "blocks": recipe.blocks_text(),
        "arch": recipe.arch,
        "unet_only": recipe.unet_only,
        "density": recipe.density,
        "drop": recipe.drop,
        "lam": recipe.lam,
        "seed": recipe.seed,
        "precision": recipe.precision,
        "save_dtype": recipe.save_dtype,
        "strict": recipe.strict,
        "overwrite": recipe.overwrite,
    }


def recipe_parts(recipe: MergeRecipe, folder: str | os.PathLike[str]) -> dict[str, tuple[str, str]]:
    """The separate text-encoder files of a bake recipe: slot -> ``(input, output)``, paths resolved
    against ``folder`` (the ``parts`` argument of :func:`lorasmith.ops.components.bake_parts`)."""
    base = Path(folder)
    out: dict[str, tuple[str, str]] = {}
    for name, out_name in PART_FIELDS.items():
        src, dst = getattr(recipe, name), getattr(recipe, out_name)
        if src is not None and dst is not None:
            out[name] = (_resolve(base, src), _resolve(base, dst))
    return out


def run_recipe(
    recipe: MergeRecipe,
    folder: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> MergeResult | ComponentsResult:
    """Run a recipe: :func:`~lorasmith.ops.merge.merge`, or
    :func:`~lorasmith.ops.components.bake_parts` when it names separate text-encoder files.

    :param folder: relative paths are resolved against it (the recipe's folder).
    :param output: an output given apart (the command line's ``-o``); it wins over the recipe's.
    :param overwrite: replace existing outputs (also when the recipe says so).
    :raises RecipeError: no output anywhere.
    :raises LorasmithError: what the merge or the bake raises.
    """
    args = _merge_arguments(recipe, folder, None if output is None else str(output))
    if output is not None:
        args["output"] = str(output)
    args["overwrite"] = bool(args["overwrite"] or overwrite)
    parts = recipe_parts(recipe, folder)
    fields = _check_inputs(recipe, Path(folder))
    if output is None and recipe.output is not None:
        fields[args["output"]] = "output"
        fields.setdefault(
            str(Path(args["output"]).parent), "output"
        )  # "FOLDER: output folder does not exist"
    for name, (_src, dst) in parts.items():
        fields[dst] = PART_FIELDS[name]
    try:
        if parts:
            from lorasmith.ops.components import bake_parts

            assert args["base"] is not None  # load_recipe checked it
            return bake_parts(
                args["base"],
                args["loras"],
                args["output"],
                parts=parts,
                arch=args["arch"],
                blocks=args["blocks"],
                precision=args["precision"],
                save_dtype=args["save_dtype"],
                strict=args["strict"],
                overwrite=args["overwrite"],
                progress=progress,
            )
        from lorasmith.ops.merge import merge

        return merge(**args, progress=progress)
    except LorasmithError as exc:
        field = _field_of(exc, fields, recipe)
        if field is None:
            raise
        raise _in_recipe(exc, f"{recipe._source}: {field}: ") from None


def _inputs(recipe: MergeRecipe) -> list[tuple[str, str]]:
    """``(field, path as written)`` of every input file of a recipe."""
    out = [(f"loras[{i}]", x.path) for i, x in enumerate(recipe.loras)]
    out += [(f"models[{i}]", x.path) for i, x in enumerate(recipe.models)]
    if recipe.base is not None:
        out.append(("base", recipe.base))
    out += [(name, getattr(recipe, name)) for name in PART_FIELDS if getattr(recipe, name) is not None]
    return out


def _check_inputs(recipe: MergeRecipe, folder: Path) -> dict[str, str]:
    """Check that every input file of ``recipe`` is there, before anything is read.

    :return: resolved path -> field, for naming the field in later errors.
    :raises RecipeError: a missing input, a folder, a ``FILE:RATIO`` whose ratio is not a number.
    """
    fields: dict[str, str] = {}
    for name, written in _inputs(recipe):
        path = _resolve(folder, written)
        fields[path] = name
        p = Path(path)
        if p.is_file():
            continue
        head, sep, tail = written.rpartition(":")
        if sep and head and not p.exists() and Path(_resolve(folder, head)).is_file():
            problem, hint = (
                f"ratio {tail!r} is not a number",
                "write FILE:RATIO with a number (a.safetensors:0.7)",
            )
        else:
            if p.is_dir():
                problem = "is a directory, not a file"
            elif p.exists():
                problem = "not a regular file"
            else:
                problem = "no such file"
            hint = f"relative paths in a recipe are relative to its folder ({folder.absolute()})"
        raise RecipeError([f"{recipe._source}: {name}: {path}: {problem}"], hint=hint)
    return fields


def _field_of(exc: LorasmithError, fields: dict[str, str], recipe: MergeRecipe) -> str | None:
    """The recipe field a merge error is about, when it can be told: the file it names first, or the
    option it is about."""
    from lorasmith.ops.blocks import BlockWeightError

    if isinstance(exc, RecipeError) or exc.exit_code not in (EXIT_USER, EXIT_USAGE):
        return None
    from lorasmith.io.writer import NonFiniteError

    if isinstance(exc, NonFiniteError):
        return None
    msg = exc.message
    for path, name in sorted(fields.items(), key=lambda kv: -len(kv[0])):
        if msg.startswith((f"{path}:", f"{path} ")):
            return name
    if isinstance(exc, BlockWeightError):
        return "blocks"
    if recipe.to is not None and "spelling" in msg:
        return "to"
    for option in ("dynamic", "rank"):
        if f"--{option}" in msg and getattr(recipe, option) is not None:
            return option
    if msg.startswith("inputs of different families"):
        return "loras"
    if msg.startswith("checkpoints of different families"):
        return "models"
    return None


def _in_recipe(exc: LorasmithError, where: str) -> LorasmithError:
    """A copy of ``exc`` (same class, so the same exit code) whose message starts with ``where``.

    A usage error (exit code 2) is about the recipe's content here, not the command line: exit code 1.
    """
    if isinstance(exc, UsageError):
        return LorasmithError(where + exc.message, hint=exc.hint)
    new = exc.__class__.__new__(exc.__class__)
    new.__dict__.update(exc.__dict__)
    new.message = where + exc.message
    new.args = (new.message,)
    return new
