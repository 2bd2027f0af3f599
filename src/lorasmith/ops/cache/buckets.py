"""Aspect-ratio buckets, resize sizes and crop boxes, as the trainers compute them.

Two rule sets, because the two trainer families differ:

- **sd-scripts** (SD1/2, SDXL, FLUX, SD3): the bucket list is built from the maximum area
  ``resolution W x H``: the square ``floor(sqrt(W*H) / step) * step``, then for every width from
  ``min_bucket_reso`` to ``max_bucket_reso`` in ``bucket_reso_steps`` the height
  ``min(max, floor((W*H // width) / step) * step)``, kept when it is at least the minimum, in both
  orientations. An image whose exact size is a bucket keeps it; any other takes the bucket of the nearest
  aspect ratio (first one on ties, list sorted). Without bucketing the only bucket is ``resolution``.
- **musubi-tuner** (Z-Image): buckets of area ``W*H`` in steps of 16, widths from
  ``floor((sqrt(W*H) // 2) / 16) * 16`` up to ``sqrt(W*H)``, each with height ``floor(W*H / width)``
  rounded down to the step; nearest aspect ratio wins (first on ties), even for an image whose size is a
  bucket (musubi-tuner has no exact-size rule).

In both, the image is scaled so that it covers the bucket (``int(side * scale + 0.5)``) and centre-cropped.
``crop_ltrb`` is what sd-scripts stores: where the scaled image (fitted *inside* the bucket, Stability AI's
convention) would sit, as floats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "BucketRules",
    "Placement",
    "crop_ltrb",
    "musubi_bucket_resolutions",
    "place",
    "sd_scripts_bucket_resolutions",
]

Size = tuple[int, int]


def sd_scripts_bucket_resolutions(max_reso: Size, min_size: int, max_size: int, step: int) -> list[Size]:
    """The sd-scripts bucket list for a maximum area ``max_reso`` (``(W, H)``), sorted."""
    area = max_reso[0] * max_reso[1]
    resos: set[Size] = set()
    side = int(math.sqrt(area) // step) * step
    resos.add((side, side))
    width = min_size
    while width <= max_size:
        height = min(max_size, int((area // width) // step) * step)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += step
    return sorted(resos)


def musubi_bucket_resolutions(resolution: Size, step: int = 16) -> list[Size]:
    """The musubi-tuner bucket list for ``resolution`` (``(W, H)``), sorted."""
    area = resolution[0] * resolution[1]
    sqrt_size = int(math.sqrt(area))
    lo = (sqrt_size // 2) - (sqrt_size // 2) % step
    resos: set[Size] = set()
    for w in range(lo, sqrt_size + step, step):
        h = (area // w) - (area // w) % step
        resos.add((w, h))
        resos.add((h, w))
    return sorted(resos)


@dataclass(frozen=True)
class BucketRules:
    """How images are assigned to buckets.

    :ivar resolution: ``(W, H)``; the maximum area with bucketing, the only size without.
    :ivar enable_bucket: bucket by aspect ratio.
    :ivar min_bucket_reso: smallest bucket side (sd-scripts rules).
    :ivar max_bucket_reso: largest bucket side (sd-scripts rules).
    :ivar bucket_reso_steps: bucket sides are multiples of this.
    :ivar style: ``sd-scripts`` or ``musubi``.
    """

    resolution: Size
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    style: str = "sd-scripts"

    def resolutions(self) -> list[Size]:
        """The predefined buckets."""
        if not self.enable_bucket:
            return [self.resolution]
        if self.style == "musubi":
            return musubi_bucket_resolutions(self.resolution, self.bucket_reso_steps)
        return sd_scripts_bucket_resolutions(
            self.resolution, self.min_bucket_reso, self.max_bucket_reso, self.bucket_reso_steps
        )


@dataclass(frozen=True)
class Placement:
    """Where one image goes.

    :ivar bucket: the bucket ``(W, H)``: the size of the encoded image.
    :ivar resized: the size ``(W, H)`` the image is scaled to before the centre crop.
    :ivar crop_ltrb: the sd-scripts ``crop_ltrb`` value.
    """

    bucket: Size
    resized: Size
    crop_ltrb: tuple[float, float, float, float]


def crop_ltrb(bucket: Size, image_size: Size) -> tuple[float, float, float, float]:
    """sd-scripts' ``crop_ltrb``: the image fitted inside the bucket and centred (floats, floor-halved)."""
    bucket_ar = bucket[0] / bucket[1]
    image_ar = image_size[0] / image_size[1]
    if bucket_ar > image_ar:
        rw, rh = bucket[1] * image_ar, float(bucket[1])
    else:
        rw, rh = float(bucket[0]), bucket[0] / image_ar
    left = (bucket[0] - rw) // 2
    top = (bucket[1] - rh) // 2
    return (left, top, left + rw, top + rh)


def place(image_size: Size, resolutions: list[Size], keep_exact: bool = True) -> Placement:
    """The bucket, resize size and crop box of an image of ``image_size`` (``(W, H)``).

    :param keep_exact: an image whose size is a bucket keeps it (sd-scripts); musubi-tuner goes by aspect
        ratio alone, which can pick an earlier bucket of the same ratio.
    """
    w, h = image_size
    ar = w / h
    if keep_exact and image_size in resolutions:
        bucket = image_size
    else:
        # nearest aspect ratio; ``min`` keeps the first on ties, as numpy's argmin does
        bucket = min(resolutions, key=lambda r: abs(r[0] / r[1] - ar))
    # scale so the image covers the bucket: match the side that is relatively shorter
    scale = bucket[1] / h if ar > bucket[0] / bucket[1] else bucket[0] / w
    resized = (int(w * scale + 0.5), int(h * scale + 0.5))
    return Placement(bucket, resized, crop_ltrb(bucket, image_size))
