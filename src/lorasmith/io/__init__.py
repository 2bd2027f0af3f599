"""Safetensors input and output.

This package and :mod:`lorasmith.io.header`, :mod:`lorasmith.io.layout` and :mod:`lorasmith.io.hashes` never
import torch. The torch-side pieces are imported from their own modules:

- :mod:`lorasmith.io.reader`: :func:`~lorasmith.io.reader.open_tensors`,
  :func:`~lorasmith.io.reader.load_all`;
- :mod:`lorasmith.io.writer`: :class:`~lorasmith.io.writer.SafetensorsWriter`,
  :func:`~lorasmith.io.writer.save_file`;
- :mod:`lorasmith.io.dtypes`: safetensors dtype strings <-> torch dtypes.
"""

from __future__ import annotations

from lorasmith.io.header import DTYPE_SIZES, Header, TensorInfo, read_header

__all__ = ["DTYPE_SIZES", "Header", "TensorInfo", "read_header"]
