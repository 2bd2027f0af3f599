"""Device and dtype policy: where and in what precision the linear algebra runs.

- ``--device auto|cpu|cuda|cuda:N`` resolves through :func:`resolve_device`; asking for CUDA where there
  is none (or for a GPU index that does not exist) is a :class:`LinalgError`, never a silent fallback.
- Computation is float32 (float64 in tests, where results are compared against dense references at
  1e-10); :func:`compute_dtype` says which, and :func:`to_compute` moves a tensor there. Casting to the
  storage dtype (fp16, bf16) happens on save, above this layer.
"""

from __future__ import annotations

import torch

from .errors import LinalgError

__all__ = ["compute_dtype", "resolve_device", "to_compute"]

_SPEC_HINT = "use 'auto', 'cpu', 'cuda' or 'cuda:N'"


def _cuda_count() -> int:
    # device_count() without is_available() can report devices that cannot be initialised.
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(spec: str) -> torch.device:
    """Turn a ``--device`` value into a :class:`torch.device`.

    - ``"auto"``: the current CUDA device if CUDA is available, else the CPU;
    - ``"cpu"``;
    - ``"cuda"``: the current CUDA device (an explicit index, e.g. ``cuda:0``);
    - ``"cuda:N"``: GPU ``N``.

    Case and surrounding spaces are ignored.

    :raises LinalgError: for any other value, for CUDA when it is not available, or for an index that
        is not a visible GPU.
    """
    text = spec.strip().lower()
    if text == "cpu":
        return torch.device("cpu")
    count = _cuda_count()
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if count > 0 else torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        if count == 0:
            raise LinalgError(f"device {spec!r} was asked for but CUDA is not available here; use 'cpu'")
        if text == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        index_text = text[len("cuda:") :]
        if not index_text.isdigit():
            raise LinalgError(f"unknown device {spec!r}; {_SPEC_HINT}")
        index = int(index_text)
        if index >= count:
            raise LinalgError(
                f"device {spec!r} does not exist: {count} CUDA device(s) visible, indices 0 to {count - 1}"
            )
        return torch.device("cuda", index)
    raise LinalgError(f"unknown device {spec!r}; {_SPEC_HINT}")


def compute_dtype(device: torch.device, test_mode: bool = False) -> torch.dtype:
    """The dtype to compute in on ``device``: float32, or float64 when ``test_mode`` is set.

    float32 is accurate enough for LoRA deltas stored in fp16 / bf16 and is fast on every device;
    float64 lets tests compare against dense references at 1e-10. ``device`` is accepted so that a
    device-specific policy can be added without changing callers; today both CPU and CUDA use the rule
    above.
    """
    del device  # the same policy on every device supported so far
    return torch.float64 if test_mode else torch.float32


def to_compute(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Return ``t`` on ``device`` in ``dtype``, detached from autograd (``t`` itself when nothing changes).

    The input is never modified in place; callers that need a private copy must clone.

    :raises LinalgError: if ``dtype`` is not a floating-point dtype.
    """
    if not dtype.is_floating_point:
        raise LinalgError(f"compute dtype must be floating point, got {dtype}")
    out = t.to(device=device, dtype=dtype)
    # detach() always makes a new tensor object; only pay for it when autograd is actually involved.
    return out.detach() if out.requires_grad else out
