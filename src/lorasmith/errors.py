"""The one exception hierarchy of lorasmith.

Every error a user can cause is a :class:`LorasmithError`: it carries a one-line message, an optional hint
and the process exit code. The CLI prints ``error: <message>`` and ``hint: <hint>`` on stderr and exits
with :attr:`LorasmithError.exit_code`, never with a traceback (``LORASMITH_DEBUG=1`` shows it anyway).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_USER = 1
EXIT_USAGE = 2
EXIT_PLUGIN = 3
EXIT_INTERRUPTED = 130


class LorasmithError(Exception):
    """Base class of every error lorasmith reports to a user.

    :param message: one line saying what is wrong, naming the file or value concerned.
    :param hint: one line saying what to do about it, or ``None``.
    """

    exit_code: int = EXIT_USER

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(LorasmithError):
    """Bad command-line usage: an unknown option value, a missing argument, conflicting options."""

    exit_code = EXIT_USAGE


class InvalidFileError(LorasmithError):
    """A file that is not a valid safetensors (or pickle, or folder) file, or cannot be read."""


class OutputExistsError(LorasmithError):
    """The output exists and ``--overwrite`` was not given, or the output would replace an input."""


class DetectionError(LorasmithError):
    """The family of a file cannot be told, or two families claim it equally."""


class UnknownArchError(LorasmithError):
    """An architecture id that no loaded plugin provides."""


class ArchMismatchError(LorasmithError):
    """Inputs of different families, or a LoRA given with a base of another family."""


class ShapeMismatchError(LorasmithError):
    """Tensors that should agree in shape do not."""


class AdapterError(LorasmithError):
    """A LoRA/LyCORIS module that cannot be parsed: missing factor, mismatched rank, bad alpha."""


class NotAvailableError(LorasmithError):
    """A command or option that this version does not provide yet."""


class PluginError(LorasmithError):
    """A plugin failed to load or broke the plugin contract (duplicate id, alias conflict, bad hook)."""

    exit_code = EXIT_PLUGIN


class InterruptedRun(LorasmithError):
    """The run was interrupted by SIGINT or SIGTERM; no partial output was left."""

    exit_code = EXIT_INTERRUPTED
