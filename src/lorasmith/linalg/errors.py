"""The exception types of :mod:`lorasmith.linalg`.

The linear-algebra layer is a leaf: it cannot import :mod:`lorasmith.errors`. It raises
:class:`LinalgError` for every bad input it detects (wrong shapes, unsupported dtypes, invalid rank
parameters, unusable devices, non-finite values); the layers above catch it and wrap it into the
user-facing hierarchy with a hint and an exit code. :class:`NonFiniteFactorsError` is the one subclass, so
that a caller can name the corrupt module instead of forwarding a generic message.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["LinalgError", "NonFiniteFactorsError"]


class LinalgError(ValueError):
    """An input that :mod:`lorasmith.linalg` cannot work with.

    The message is one line that names the offending value (a shape, a dtype, a parameter) so that a
    caller can forward it to the user unchanged.
    """


class NonFiniteFactorsError(LinalgError):
    """Factors that hold NaN or infinite values, or whose products overflow the compute dtype.

    :ivar problems: the indices of the offending problems of a batched call (``(0,)`` for a single one),
        so that a caller can name the modules they came from.
    """

    def __init__(self, message: str, problems: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.problems: tuple[int, ...] = tuple(problems)
