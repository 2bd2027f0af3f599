"""Per-family facts of the trainers' latent caches (names, keys, latent scaling).

| family | file next to the image (``<s>`` = ``<stem>_{W:04d}x{H:04d}``) | keys | stored latents |
|---|---|---|---|
| sd1, sd2 | ``<s>_sd.npz`` | ``latents``, ``original_size``, ``crop_ltrb`` | raw VAE sample |
| sdxl | ``<s>_sdxl.npz`` | same | raw VAE sample |
| flux | ``<s>_flux.npz`` | same, each suffixed ``_{h}x{w}`` | ``0.3611 * (z - 0.1159)`` |
| sd3 | ``<s>_sd3.npz`` | same, each suffixed ``_{h}x{w}`` | raw VAE sample |
| zimage | ``<s>_zi.safetensors`` | ``latents_1x{h}x{w}_float32`` | raw VAE mean |

``W x H`` is the *original* image size; ``h x w`` the latent size. sd-scripts applies the SD/SDXL scale
(0.18215 / 0.13025) and the SD3 scale and shift (1.5305, 0.0609) at training time, so those caches hold
the unscaled sample; its FLUX autoencoder (BFL's ``AutoEncoder.encode``) scales and shifts inside
``encode``, so FLUX caches hold the scaled value. Z-Image caches are musubi-tuner's safetensors format
(``zimage_cache_latents.py``: metadata ``architecture=z_image``, ``width``, ``height``,
``format_version=1.0.1``); its Z-Image autoencoder's ``encode`` returns the plain posterior, the cache
script stores its ``mode()`` (the mean) and the trainer applies ``(z - 0.1159) * 0.3611`` when it loads
the latents (``scale_shift_latents``), so Z-Image caches hold the unscaled mean.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorasmith.errors import UsageError

__all__ = ["FAMILIES", "LatentFamily", "latent_family"]


@dataclass(frozen=True)
class LatentFamily:
    """How one family's latent cache is named, keyed and scaled.

    :ivar arch: the family id.
    :ivar suffix: what follows ``<stem>_{W:04d}x{H:04d}`` in the cache file name.
    :ivar multi_resolution: keys carry a ``_{h}x{w}`` suffix (one file may hold several resolutions).
    :ivar scaling_factor: the VAE's latent scale.
    :ivar shift_factor: the VAE's latent shift.
    :ivar stores_scaled: the cache holds ``scale * (z - shift)`` rather than ``z``.
    :ivar latent_channels: channels of the VAE latent.
    :ivar musubi: musubi-tuner safetensors format (else sd-scripts ``.npz``).
    :ivar default_resolution: the training resolution used when none is given.
    :ivar default_steps: the default bucket step.
    :ivar default_dist: what the trainer's own cache script stores: ``sample`` (sd-scripts draws from the
        posterior) or ``mean`` (musubi-tuner takes its mode).
    """

    arch: str
    suffix: str
    multi_resolution: bool
    scaling_factor: float
    shift_factor: float
    stores_scaled: bool
    latent_channels: int
    musubi: bool = False
    default_resolution: int = 512
    default_steps: int = 64
    default_dist: str = "sample"


FAMILIES: dict[str, LatentFamily] = {
    "sd1": LatentFamily("sd1", "_sd.npz", False, 0.18215, 0.0, False, 4, default_resolution=512),
    "sd2": LatentFamily("sd2", "_sd.npz", False, 0.18215, 0.0, False, 4, default_resolution=768),
    "sdxl": LatentFamily("sdxl", "_sdxl.npz", False, 0.13025, 0.0, False, 4, default_resolution=1024),
    "flux": LatentFamily("flux", "_flux.npz", True, 0.3611, 0.1159, True, 16, default_resolution=1024),
    "sd3": LatentFamily("sd3", "_sd3.npz", True, 1.5305, 0.0609, False, 16, default_resolution=1024),
    # musubi-tuner stores the unscaled posterior mode; its trainer scales and shifts on load
    "zimage": LatentFamily(
        "zimage", "_zi.safetensors", False, 0.3611, 0.1159, False, 16, True, 1024, 16, "mean"
    ),
}


def latent_family(arch: str, variant: str | None = None) -> LatentFamily:
    """The :class:`LatentFamily` of a family id (``sd1`` with variant ``sd2`` gives ``sd2``).

    :raises UsageError: a family without a latent cache format.
    """
    key = "sd2" if arch == "sd1" and variant == "sd2" else arch
    fam = FAMILIES.get(key)
    if fam is None:
        raise UsageError(
            f"family {arch!r} has no known latent cache format",
            hint=f"pass --arch with one of: {', '.join(FAMILIES)}",
        )
    return fam
