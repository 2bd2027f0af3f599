"""``cache latents`` with ``bucket_no_upscale``: buckets that follow the image and never enlarge it.

Expected buckets are worked out by hand from sd-scripts' rule (``BucketManager.select_bucket`` with
``no_upscale``), for ``resolution`` 128 (area 16384) and ``bucket_reso_steps`` 32:

- an image of at most 16384 pixels keeps its size; its bucket is each side rounded down to 32;
- a larger one of aspect ``a`` is sized ``w = sqrt(16384 a)``, ``h = 16384 / w``; ``r(x)`` rounds half up
  then down to 32; the width candidate ``(r(w), r(r(w) / a))`` and the height candidate
  ``(r(r(h) a), r(h))`` are compared by how far their aspect ratio is from ``a`` (ties: the height);
  the winner's rounded side is kept and the other side is ``int(side * a + 0.5)`` (or ``/ a``); the
  bucket is that size rounded down to 32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("diffusers")
pytest.importorskip("PIL")

import torch
from PIL import Image
from test_cache_latents import _direct, _images, _tiny_vae, _write_ckpt

from lorasmith.cli import app
from lorasmith.ops.cache.buckets import BucketRules, place_no_upscale
from lorasmith.ops.cache.latents import cache_latents, prepare_image

runner = CliRunner()

RULES = BucketRules((128, 128), True, 256, 1024, 32, no_upscale=True)

# image size -> (resized, bucket), by hand (see the module notes)
CASES = {
    # small: kept, rounded down: 100 -> 96, 60 -> 32
    (100, 60): ((100, 60), (96, 32)),
    (64, 64): ((64, 64), (64, 64)),
    # a = 1.5: w = 156.77 -> 128, r(128 / 1.5 = 85.3) = 64, aspect 2.0 (off by 0.5);
    # h = 104.51 -> 96, r(96 * 1.5 = 144) = 128, aspect 1.33 (off by 0.17): the height wins
    (300, 200): ((144, 96), (128, 96)),
    # a = 0.7: w = 107.09 -> 96, r(137.1) = 128, aspect 0.75 (off by 0.05);
    # h = 152.99 -> 128, r(89.6) = 64, aspect 0.5 (off by 0.2): the width wins, 96 / 0.7 -> 137
    (210, 300): ((96, 137), (96, 128)),
    # a = 4/3: both candidates are exactly 128 x 96; a tie goes to the height
    (400, 300): ((128, 96), (128, 96)),
    # a = 10: w -> 384, r(38.4) = 32, aspect 12; h = 40.5 -> 32, r(320) = 320, aspect 10: the height
    (1000, 100): ((320, 32), (320, 32)),
}


@pytest.mark.parametrize(("size", "expected"), list(CASES.items()))
def test_sd_scripts_no_upscale_buckets_by_hand(
    size: tuple[int, int], expected: tuple[tuple[int, int], tuple[int, int]]
) -> None:
    p = place_no_upscale(size, RULES)
    assert (p.resized, p.bucket) == expected


def test_no_upscale_ignores_min_and_max_bucket_reso() -> None:
    # sd-scripts warns that min_bucket_reso / max_bucket_reso mean nothing with bucket_no_upscale
    tight = BucketRules((128, 128), True, 100, 120, 32, no_upscale=True)
    assert place_no_upscale((1000, 100), tight).bucket == (320, 32)
    assert place_no_upscale((100, 60), tight).bucket == (96, 32)


def test_no_upscale_crop_box_is_sd_scripts() -> None:
    p = place_no_upscale((100, 60), RULES)
    # the 100x60 image fitted inside 96x32 (height-bound, width 53.33) and centred
    assert p.crop_ltrb == (21.0, 0.0, 32 * (100 / 60) + 21.0, 32.0)


def test_musubi_no_upscale() -> None:
    rules = BucketRules((64, 64), True, bucket_reso_steps=16, style="musubi", no_upscale=True)
    small = place_no_upscale((50, 40), rules)
    # at most the area: the size rounded down to 16, then musubi-tuner's cover-and-crop resize
    assert small.bucket == (48, 32) and small.resized == (48, 38)
    # above the area: the usual nearest-aspect bucket (80x48 for aspect 2 at 64x64, step 16)
    assert place_no_upscale((100, 50), rules).bucket == (80, 48)


# ----------------------------------------------------------------------------------------- end to end
def test_cached_latent_sizes_follow_the_images(tmp_path: Path) -> None:
    vae = _tiny_vae(4, True)
    ckpt = _write_ckpt(tmp_path / "m.safetensors", vae, "first_stage_model.")
    data = tmp_path / "data"
    sizes = {f"i{w}x{h}.png": (w, h) for w, h in CASES} | {"tiny.png": (40, 20)}
    _images(data, sizes)
    r = cache_latents(
        ckpt,
        dataset=data,
        arch="sdxl",
        resolution=128,
        enable_bucket=True,
        bucket_reso_steps=32,
        bucket_no_upscale=True,
        latent_dist="mean",
        batch_size=2,
    )
    assert (r.written, r.failed) == (len(CASES), 1)
    failed = next(it for it in r.items if it.status == "failed")
    assert "tiny.png" in (failed.error or "") and "bucket_reso_steps 32" in (failed.error or "")
    for (w, h), (_resized, (bw, bh)) in CASES.items():
        with np.load(data / f"i{w}x{h}_{w:04d}x{h:04d}_sdxl.npz") as z:
            assert z["latents"].shape == (4, bh // 8, bw // 8)
            assert z["original_size"].tolist() == [w, h]
    # an image that needs no resize is only cropped: 100x60 -> the centred 96x32
    with np.load(data / "i100x60_0100x0060_sdxl.npz") as z:
        rgb = np.asarray(Image.open(data / "i100x60.png").convert("RGB"), dtype=np.float32) / 255.0
        crop = rgb[14:46, 2:98]
        pixels = ((crop - 0.5) / 0.5).transpose(2, 0, 1).copy()
        torch.testing.assert_close(torch.from_numpy(z["latents"]), _direct(vae, pixels), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(z["crop_ltrb"], [21.0, 0.0, 32 * 100 / 60 + 21.0, 32.0])
    # a shrunk one: prepared with its placement
    with np.load(data / "i300x200_0300x0200_sdxl.npz") as z:
        pixels, _ = prepare_image(data / "i300x200.png", place_no_upscale((300, 200), RULES), False)
        assert pixels.shape == (3, 96, 128)
        torch.testing.assert_close(torch.from_numpy(z["latents"]), _direct(vae, pixels), rtol=1e-5, atol=1e-5)
    assert r.buckets["96x32"] == 1 and r.buckets["320x32"] == 1


def test_no_upscale_from_the_toml_and_the_cli(tmp_path: Path) -> None:
    vae = _tiny_vae(4, True)
    ckpt = _write_ckpt(tmp_path / "m.safetensors", vae, "first_stage_model.")
    _images(tmp_path / "imgs", {"a.png": (100, 60)})
    cfg = tmp_path / "dataset.toml"
    cfg.write_text(
        "[general]\nenable_bucket = true\nbucket_reso_steps = 32\n"
        "[[datasets]]\nresolution = 128\nbucket_no_upscale = true\n"
        '[[datasets.subsets]]\nimage_dir = "imgs"\n'
    )
    r = cache_latents(ckpt, dataset_config=cfg, arch="sdxl", latent_dist="mean")
    assert r.written == 1 and r.items[0].bucket == (96, 32)
    # without --enable-bucket the flag does nothing, as in the trainers: the one 128x128 bucket
    args = ["cache", "latents", "--model", str(ckpt), "--arch", "sdxl", "--dataset", str(tmp_path / "imgs")]
    args += ["--resolution", "128", "--bucket-reso-steps", "32", "--bucket-no-upscale", "--overwrite"]
    res = runner.invoke(app, [*args, "--no-skip-existing"])
    assert res.exit_code == 0, res.output
    assert "128x128: 1" in res.stdout
    res = runner.invoke(app, [*args, "--no-skip-existing", "--enable-bucket"])
    assert res.exit_code == 0 and "96x32: 1" in res.stdout
