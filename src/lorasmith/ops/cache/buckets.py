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

With ``bucket_no_upscale`` the image is never enlarged and the bucket follows the image, not a list:

- **sd-scripts** (``BucketManager.select_bucket`` with ``no_upscale``): an image of at most the area
  ``W*H`` keeps its size and its bucket is that size rounded down to ``bucket_reso_steps`` on each side
  (the excess cropped); a larger image is first shrunk to about that area at its own aspect ratio, the
  side (width or height) whose rounding to the step keeps the aspect ratio best deciding, and then
  rounded down the same way. ``min_bucket_reso`` / ``max_bucket_reso`` play no part (sd-scripts says so
  in a warning).
- **musubi-tuner** (``BucketSelector.get_bucket_resolution`` with ``no_upscale``): an image of at most
  the bucket area gets its size rounded down to the step; a larger one the usual bucket of nearest
  aspect ratio.

Otherwise the image is scaled so that it covers the bucket (``int(side * scale + 0.5)``) and centre-cropped.
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
    "place_no_upscale",
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
    :ivar no_upscale: ``bucket_no_upscale``: buckets follow the image sizes and never enlarge an image
        (only with ``enable_bucket``, as in the trainers).
    """

    resolution: Size
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    style: str = "sd-scripts"
    no_upscale: bool = False

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


def _round_to_steps(x: float, step: int) -> int:
    # sd-scripts' BucketManager.round_to_steps: round half up, then down to a multiple of the step
    n = int(x + 0.5)
    return n - n % step


def _sd_scripts_no_upscale(image_size: Size, max_area: int, step: int) -> Size:
    """The resize size of sd-scripts' ``no_upscale`` rule (the image's own size when small enough)."""
    w, h = image_size
    if w * h <= max_area:
        return image_size
    ar = w / h
    # the size of area max_area at the image's aspect ratio
    width = math.sqrt(max_area * ar)
    height = max_area / width
    # round the width, or the height, to the step and derive the other side from the aspect ratio; keep
    # the one whose rounded pair is closer to the image's aspect ratio (the height wins ties)
    bw = _round_to_steps(width, step)
    bh_of_w = _round_to_steps(bw / ar, step)
    bh = _round_to_steps(height, step)
    bw_of_h = _round_to_steps(bh * ar, step)
    # a zero side (an extreme aspect ratio) cannot win; sd-scripts would divide by zero there
    err_w = abs(bw / bh_of_w - ar) if bh_of_w else math.inf
    err_h = abs(bw_of_h / bh - ar) if bh else math.inf
    if err_w < err_h:
        return (bw, int(bw / ar + 0.5))
    return (int(bh * ar + 0.5), bh)


def place_no_upscale(
    image_size: Size, rules: BucketRules, resolutions: list[Size] | None = None
) -> Placement:
    """Where an image goes with ``bucket_no_upscale`` (see the module notes); a bucket side may be 0 for an
    image smaller than the step, which the caller must refuse.

    :param resolutions: the musubi-tuner bucket list (for images above the area), computed once by the
        caller; built from ``rules`` when not given.
    """
    step = rules.bucket_reso_steps
    area = rules.resolution[0] * rules.resolution[1]
    w, h = image_size
    if rules.style == "musubi":
        if w * h > area:
            return place(image_size, resolutions or rules.resolutions(), keep_exact=False)
        bucket = (w - w % step, h - h % step)
        if min(bucket) == 0:
            return Placement(bucket, image_size, (0.0, 0.0, 0.0, 0.0))
        return place(image_size, [bucket], keep_exact=False)
    resized = _sd_scripts_no_upscale(image_size, area, step)
    # the bucket never exceeds the resized image: the excess is cropped, nothing is padded
    bucket = (resized[0] - resized[0] % step, resized[1] - resized[1] % step)
    return Placement(bucket, resized, crop_ltrb(bucket, image_size) if min(bucket) else (0.0, 0.0, 0.0, 0.0))
