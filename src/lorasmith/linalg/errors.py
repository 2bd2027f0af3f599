"""The one exception type of :mod:`lorasmith.linalg`.

The linear-algebra layer is a leaf: it cannot import :mod:`lorasmith.errors`. It raises
:class:`LinalgError` for every bad input it detects (wrong shapes, unsupported dtypes, invalid rank
parameters, unusable devices); the layers above catch it and wrap it into the user-facing hierarchy
with a hint and an exit code.
"""

from __future__ import annotations

__all__ = ["LinalgError"]


class LinalgError(ValueError):
    """An input that :mod:`lorasmith.linalg` cannot work with.

    The message is one line that names the offending value (a shape, a dtype, a parameter) so that a
    caller can forward it to the user unchanged.
    """
