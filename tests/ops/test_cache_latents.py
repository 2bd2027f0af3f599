"""``cache latents``: tiny real VAEs in each family's checkpoint layout, end to end on generated images."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("diffusers")
PIL = pytest.importorskip("PIL")

import torch  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402
from PIL import Image  # noqa: E402

from lorasmith.cli import app  # noqa: E402
from lorasmith.errors import UsageError  # noqa: E402
from lorasmith.io.writer import save_file  # noqa: E402
from lorasmith.ops.cache.buckets import BucketRules, crop_ltrb, place  # noqa: E402
from lorasmith.ops.cache.latents import cache_latents, latent_noise, prepare_image  # noqa: E402
from lorasmith.ops.cache.vae import build_vae, diffusers_to_ldm_vae  # noqa: E402

runner = CliRunner()


def _tiny_vae(latent_channels: int, quant: bool, seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 8, 8, 8],
        layers_per_block=2,
        latent_channels=latent_channels,
        norm_num_groups=8,
        use_quant_conv=quant,
        use_post_quant_conv=quant,
    )
    return vae.eval()


def _write_ckpt(path: Path, vae: AutoencoderKL, prefix: str) -> Path:
    tensors = diffusers_to_ldm_vae(vae.state_dict(), prefix)
    # a few non-VAE keys so the file is a "checkpoint", not just a VAE
    tensors["model.diffusion_model.out.2.weight"] = torch.zeros(4, 8, 3, 3)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, hashes=False)
    return path


def _images(folder: Path, sizes: dict[str, tuple[int, int]], alpha: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (w, h) in sizes.items():
        arr = rng.integers(0, 256, size=(h, w, 4 if alpha else 3), dtype=np.uint8)
        Image.fromarray(arr, "RGBA" if alpha else "RGB").save(folder / name)


@pytest.fixture(scope="module")
def sd_vae() -> AutoencoderKL:
    return _tiny_vae(4, True)


@pytest.fixture(scope="module")
def flux_vae() -> AutoencoderKL:
    return _tiny_vae(16, False, seed=1)


def _direct(vae: AutoencoderKL, pixels: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return vae.encode(torch.from_numpy(pixels)[None]).latent_dist.mean[0]


# ------------------------------------------------------------------------------------------ buckets
def test_sd_scripts_buckets_and_crop() -> None:
    resos = BucketRules((512, 512), True, 256, 1024, 64).resolutions()
    for r in [(512, 512), (256, 1024), (1024, 256), (384, 640), (640, 384), (448, 576), (704, 320)]:
        assert r in resos
    assert all(r[0] % 64 == 0 and r[1] % 64 == 0 for r in resos)
    assert BucketRules((512, 768)).resolutions() == [(512, 768)]
    p = place((1500, 1000), resos)  # AR 1.5: nearest bucket is 640x384 (1.667) vs 576x448 (1.29)
    assert p.bucket == (640, 384)
    assert p.resized == (640, 427)  # covers the bucket: width matches, height rounded half up
    assert crop_ltrb((640, 384), (1500, 1000)) == (32.0, 0.0, 608.0, 384.0)
    assert place((512, 512), resos).resized == (512, 512)


def test_musubi_buckets() -> None:
    resos = BucketRules((1024, 1024), True, bucket_reso_steps=16, style="musubi").resolutions()
    assert (1024, 1024) in resos and all(w % 16 == 0 and h % 16 == 0 for w, h in resos)
    assert min(min(r) for r in resos) == 512
    # musubi-tuner goes by aspect ratio alone (first on ties); sd-scripts keeps an exact-size bucket
    same_ratio = [(64, 32), (128, 64)]
    assert place((128, 64), same_ratio).bucket == (128, 64)
    assert place((128, 64), same_ratio, keep_exact=False).bucket == (64, 32)


# ----------------------------------------------------------------------------------------- the VAE
def test_vae_round_trip_from_checkpoint(tmp_path: Path, sd_vae: AutoencoderKL) -> None:
    ckpt = _write_ckpt(tmp_path / "m.safetensors", sd_vae, "first_stage_model.")
    built = build_vae(ckpt, scaling_factor=0.18215, shift_factor=0.0)
    assert built.config.latent_channels == 4 and built.config.use_quant_conv
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        a = built.encode(x).latent_dist.mean
        b = sd_vae.encode(x).latent_dist.mean
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ SD / SDXL
def test_sdxl_end_to_end_names_keys_values_and_resume(tmp_path: Path, sd_vae: AutoencoderKL) -> None:
    ckpt = _write_ckpt(tmp_path / "m.safetensors", sd_vae, "first_stage_model.")
    data = tmp_path / "data"
    _images(data, {"a.png": (128, 128), "b.png": (150, 100), "c.jpg": (100, 160)})
    (data / "a.txt").write_text("a caption")
    kwargs = {
        "dataset": data,
        "arch": "sdxl",
        "resolution": 128,
        "enable_bucket": True,
        "min_bucket_reso": 64,
        "max_bucket_reso": 256,
        "bucket_reso_steps": 32,
        "batch_size": 2,
        "flip": True,
        "latent_dist": "mean",
    }
    r = cache_latents(ckpt, **kwargs)  # type: ignore[arg-type]
    assert (r.images, r.written, r.skipped, r.failed) == (3, 3, 0, 0)
    names = sorted(p.name for p in data.glob("*.npz"))
    assert names == ["a_0128x0128_sdxl.npz", "b_0150x0100_sdxl.npz", "c_0100x0160_sdxl.npz"]
    with np.load(data / "a_0128x0128_sdxl.npz") as z:
        assert sorted(z.files) == ["crop_ltrb", "latents", "latents_flipped", "original_size"]
        assert z["latents"].dtype == np.float32 and z["latents"].shape == (4, 16, 16)
        assert z["original_size"].tolist() == [128, 128]
        assert z["crop_ltrb"].tolist() == [0, 0, 128, 128]
        # the direct call: the image needs no resize at 128x128, so build its pixels here
        pixels = np.asarray(Image.open(data / "a.png").convert("RGB"), dtype=np.float32) / 255.0
        pixels = ((pixels - 0.5) / 0.5).transpose(2, 0, 1).copy()
        torch.testing.assert_close(
            torch.from_numpy(z["latents"]), _direct(sd_vae, pixels), rtol=1e-5, atol=1e-5
        )
        flipped = _direct(sd_vae, pixels[:, :, ::-1].copy())
        torch.testing.assert_close(torch.from_numpy(z["latents_flipped"]), flipped, rtol=1e-5, atol=1e-5)
    with np.load(data / "b_0150x0100_sdxl.npz") as z:
        assert z["latents"].shape == (4, 96 // 8, 160 // 8)  # bucket 160x96
        placement = place((150, 100), BucketRules((128, 128), True, 64, 256, 32).resolutions())
        pixels, _ = prepare_image(data / "b.png", placement, False)
        torch.testing.assert_close(
            torch.from_numpy(z["latents"]), _direct(sd_vae, pixels), rtol=1e-5, atol=1e-5
        )

    again = cache_latents(ckpt, **kwargs)  # type: ignore[arg-type]
    assert (again.written, again.skipped) == (0, 3)
    mtime = (data / "a_0128x0128_sdxl.npz").stat().st_mtime_ns
    (data / "b_0150x0100_sdxl.npz").unlink()
    third = cache_latents(ckpt, **kwargs)  # type: ignore[arg-type]
    assert (third.written, third.skipped) == (1, 2)
    assert [it.image for it in third.items if it.status == "written"] == [str(data / "b.png")]
    assert (data / "a_0128x0128_sdxl.npz").stat().st_mtime_ns == mtime
    assert not list(data.glob(".*.tmp"))


def test_sd1_sample_is_seeded_per_image_and_alpha_mask(tmp_path: Path, sd_vae: AutoencoderKL) -> None:
    ckpt = _write_ckpt(tmp_path / "m.safetensors", sd_vae, "first_stage_model.")
    data = tmp_path / "data"
    _images(data, {"x.png": (64, 64)}, alpha=True)
    r = cache_latents(ckpt, dataset=data, arch="sd1", resolution=64, alpha_mask=True, seed=7)
    assert r.written == 1 and r.arch == "sd1" and not r.stores_scaled
    with np.load(data / "x_0064x0064_sd.npz") as z:
        assert sorted(z.files) == ["alpha_mask", "crop_ltrb", "latents", "original_size"]
        assert z["alpha_mask"].shape == (64, 64) and z["alpha_mask"].dtype == np.float32
        rgba = np.asarray(Image.open(data / "x.png"))
        np.testing.assert_allclose(z["alpha_mask"], rgba[:, :, 3] / 255.0, rtol=0, atol=1e-7)
        pixels = ((rgba[:, :, :3].astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1).copy()
        with torch.no_grad():
            post = sd_vae.encode(torch.from_numpy(pixels)[None]).latent_dist
        expected = post.mean[0] + post.std[0] * latent_noise(data / "x.png", (4, 8, 8), 7)
        torch.testing.assert_close(torch.from_numpy(z["latents"]), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------- FLUX / SD3
def test_flux_keys_suffixed_and_latents_scaled(tmp_path: Path, flux_vae: AutoencoderKL) -> None:
    ckpt = _write_ckpt(tmp_path / "flux.safetensors", flux_vae, "vae.")
    data = tmp_path / "data"
    _images(data, {"f.png": (64, 64)})
    r = cache_latents(ckpt, dataset=data, arch="flux", resolution=64, latent_dist="mean")
    assert r.written == 1 and r.stores_scaled
    with np.load(data / "f_0064x0064_flux.npz") as z:
        assert sorted(z.files) == ["crop_ltrb_8x8", "latents_8x8", "original_size_8x8"]
        assert z["latents_8x8"].shape == (16, 8, 8)
        pixels, _ = prepare_image(data / "f.png", place((64, 64), [(64, 64)]), False)
        expected = 0.3611 * (_direct(flux_vae, pixels) - 0.1159)
        torch.testing.assert_close(torch.from_numpy(z["latents_8x8"]), expected, rtol=1e-5, atol=1e-5)
    # another resolution adds its keys to the same file and keeps the first
    r2 = cache_latents(ckpt, dataset=data, arch="flux", resolution=32, latent_dist="mean")
    assert r2.written == 1
    with np.load(data / "f_0064x0064_flux.npz") as z:
        assert {"latents_8x8", "latents_4x4"} <= set(z.files)


def test_sd3_unscaled_multi_resolution(tmp_path: Path, flux_vae: AutoencoderKL) -> None:
    ckpt = _write_ckpt(tmp_path / "sd3.safetensors", flux_vae, "first_stage_model.")
    data = tmp_path / "data"
    _images(data, {"s.png": (64, 64)})
    cache_latents(ckpt, dataset=data, arch="sd3", resolution=64, latent_dist="mean")
    with np.load(data / "s_0064x0064_sd3.npz") as z:
        pixels, _ = prepare_image(data / "s.png", place((64, 64), [(64, 64)]), False)
        torch.testing.assert_close(
            torch.from_numpy(z["latents_8x8"]), _direct(flux_vae, pixels), rtol=1e-5, atol=1e-5
        )


def test_zimage_musubi_safetensors(tmp_path: Path, flux_vae: AutoencoderKL) -> None:
    from safetensors import safe_open

    vae_file = _write_ckpt(tmp_path / "ae.safetensors", flux_vae, "")
    data = tmp_path / "data"
    _images(data, {"z.png": (64, 48)})
    # no --latent-dist: musubi-tuner stores the posterior mode (the mean), unscaled
    r = cache_latents(vae_file, dataset=data, arch="zimage", resolution=64)
    assert r.cache_format == "musubi-tuner safetensors" and r.written == 1
    assert (r.latent_dist, r.stores_scaled, r.scaling_factor, r.shift_factor) == (
        "mean",
        False,
        0.3611,
        0.1159,
    )
    assert r.items[0].bucket is not None
    bw, bh = r.items[0].bucket
    out = data / "z_0064x0048_zi.safetensors"
    with safe_open(str(out), "pt") as f:
        assert list(f.keys()) == [f"latents_1x{bh // 8}x{bw // 8}_float32"]
        lat = f.get_tensor(f"latents_1x{bh // 8}x{bw // 8}_float32")
        meta = f.metadata()
    assert meta == {"architecture": "z_image", "width": "64", "height": "48", "format_version": "1.0.1"}
    assert lat.dtype == torch.float32 and tuple(lat.shape) == (16, bh // 8, bw // 8)
    # the trainer applies (z - 0.1159) * 0.3611 itself, so the cache holds the VAE's own mean
    pixels, _ = prepare_image(data / "z.png", place((64, 48), [(bw, bh)]), False)
    torch.testing.assert_close(lat, _direct(flux_vae, pixels), rtol=1e-5, atol=1e-5)
    assert cache_latents(vae_file, dataset=data, arch="zimage", resolution=64).skipped == 1
    # musubi-tuner's Z-Image cache has no flipped latents or alpha masks
    with pytest.raises(UsageError, match="flip"):
        cache_latents(vae_file, dataset=data, arch="zimage", resolution=64, flip=True)
    res = runner.invoke(
        app,
        [
            "cache",
            "latents",
            "--model",
            str(vae_file),
            "--arch",
            "zimage",
            "--dataset",
            str(data),
            "--alpha-mask",
        ],
    )
    assert res.exit_code == 2 and "alpha" in res.output and "Traceback" not in res.output


# ----------------------------------------------------------------------------------- errors and the CLI
def test_cli_reports_bad_images_and_goes_on(tmp_path: Path, sd_vae: AutoencoderKL) -> None:
    ckpt = _write_ckpt(tmp_path / "m.safetensors", sd_vae, "first_stage_model.")
    data = tmp_path / "data"
    _images(data, {"ok.png": (64, 64)})
    (data / "broken.png").write_bytes(b"not an image")
    args = [
        "cache",
        "latents",
        "--model",
        str(ckpt),
        "--dataset",
        str(data),
        "--arch",
        "sd1",
        "--resolution",
        "64",
    ]
    res = runner.invoke(app, [*args, "--json"])
    assert res.exit_code == 1
    payload = json.loads(res.stdout)
    assert (payload["written"], payload["failed"]) == (1, 1)
    failed = next(it for it in payload["items"] if it["status"] == "failed")
    assert "broken.png" in failed["error"]
    res2 = runner.invoke(app, [*args, "-q"])
    assert res2.exit_code == 1 and "1 skipped" in res2.stdout and "Traceback" not in res2.output


def test_existing_stale_cache_needs_overwrite(tmp_path: Path, sd_vae: AutoencoderKL) -> None:
    ckpt = _write_ckpt(tmp_path / "m.safetensors", sd_vae, "first_stage_model.")
    data = tmp_path / "data"
    _images(data, {"a.png": (64, 64)})
    cache_latents(ckpt, dataset=data, arch="sd1", resolution=64)
    r = cache_latents(ckpt, dataset=data, arch="sd1", resolution=64, flip=True)  # needs latents_flipped
    assert r.failed == 1 and "--overwrite" in (r.items[0].error or "")
    r = cache_latents(ckpt, dataset=data, arch="sd1", resolution=64, flip=True, overwrite=True)
    assert r.written == 1


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root ignores permissions")
def test_unwritable_folder_is_reported(tmp_path: Path, sd_vae: AutoencoderKL) -> None:
    ckpt = _write_ckpt(tmp_path / "m.safetensors", sd_vae, "first_stage_model.")
    data = tmp_path / "data"
    _images(data, {"a.png": (64, 64)})
    data.chmod(0o555)
    try:
        r = cache_latents(ckpt, dataset=data, arch="sd1", resolution=64)
    finally:
        data.chmod(0o755)
    assert r.failed == 1 and "cannot write" in (r.items[0].error or "")


def test_usage_errors(tmp_path: Path, sd_vae: AutoencoderKL) -> None:
    ckpt = _write_ckpt(tmp_path / "m.safetensors", sd_vae, "first_stage_model.")
    with pytest.raises(UsageError):
        cache_latents(ckpt, arch="sd1")  # neither --dataset nor --dataset-config
    res = runner.invoke(
        app, ["cache", "latents", "--model", str(ckpt), "--dataset", str(tmp_path), "--arch", "nope"]
    )
    assert res.exit_code != 0 and "Traceback" not in res.output


def test_dataset_config_toml(tmp_path: Path, sd_vae: AutoencoderKL) -> None:
    ckpt = _write_ckpt(tmp_path / "m.safetensors", sd_vae, "first_stage_model.")
    _images(tmp_path / "imgs", {"a.png": (64, 64), "b.png": (96, 64)})
    cfg = tmp_path / "dataset.toml"
    cfg.write_text(
        "[general]\nenable_bucket = true\nmin_bucket_reso = 32\nmax_bucket_reso = 128\n"
        "bucket_reso_steps = 32\n"
        "[[datasets]]\nresolution = 64\nbatch_size = 2\n"
        '[[datasets.subsets]]\nimage_dir = "imgs"\nflip_aug = true\n'
    )
    r = cache_latents(ckpt, dataset_config=cfg, arch="sdxl", latent_dist="mean")
    assert r.written == 2
    with np.load(tmp_path / "imgs" / "b_0096x0064_sdxl.npz") as z:
        assert "latents_flipped" in z.files
    bad = tmp_path / "bad.toml"
    bad.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "imgs"\nrandom_crop = true\n')
    res = runner.invoke(
        app, ["cache", "latents", "--model", str(ckpt), "--dataset-config", str(bad), "--arch", "sdxl"]
    )
    assert res.exit_code == 2 and "random_crop" in res.output and "Traceback" not in res.output


def test_missing_extra_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "diffusers" else real(n, *a))
    res = runner.invoke(
        app, ["cache", "latents", "--model", str(tmp_path / "m.safetensors"), "--dataset", "."]
    )
    assert res.exit_code == 1
    assert "pip install 'lorasmith[cache]'" in res.output and "Traceback" not in res.output
