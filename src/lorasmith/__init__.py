"""lorasmith: inspect, merge, resize, extract, convert and cache diffusion-model LoRAs and checkpoints.

Importing this package is cheap: it never imports torch. The library entry points live in
:mod:`lorasmith.ops`; family plugins are reached through :mod:`lorasmith.registry`.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
