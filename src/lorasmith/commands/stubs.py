"""Commands that a later release provides: each says so and exits 1; nothing pretends to work."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer

from lorasmith.commands._common import guarded
from lorasmith.errors import NotAvailableError

_ISSUE_HINT = "this command is planned; see docs/{name}.md for what it will do"


def _stub(name: str, summary: str) -> Callable[..., None]:
    @guarded
    def command(
        args: Annotated[list[str] | None, typer.Argument(help="Arguments (not used yet).")] = None,
    ) -> None:
        raise NotAvailableError(
            f"`lorasmith {name}` is not available yet", hint=_ISSUE_HINT.format(name=name)
        )

    command.__doc__ = f"{summary} (not available yet)."
    return command


def register_one(app: typer.Typer, name: str) -> None:
    """Add the stub of the planned command ``name``."""
    app.command(
        name,
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )(_stub(name, STUBS[name]))


STUBS: dict[str, str] = {
    "merge": "Merge LoRAs, bake LoRAs into a checkpoint, or merge checkpoints",
    "resize": "Lower a LoRA's rank",
    "extract": "Extract a LoRA from the difference of two checkpoints",
    "convert": "Convert between LoRA spellings, checkpoint layouts and dtypes",
    "cache": "Cache latents, text-encoder outputs and base-model norms",
}
