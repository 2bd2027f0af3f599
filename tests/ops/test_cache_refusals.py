"""What ``lorasmith cache`` refuses (as sd-scripts refuses it) and the old ``<stem>.npz`` latent files.

sd-scripts will not cache latents with ``random_crop`` / ``color_aug`` (``is_latent_cacheable``), nor
text-encoder outputs with ``shuffle_caption``, ``caption_dropout_rate``, ``caption_tag_dropout_rate`` or
``token_warmup_step`` (``is_text_encoder_output_cacheable``); lorasmith refuses the same, by file and
table. Its SD/SDXL latent strategy loads ``<stem>.npz`` instead of the new name when it exists
(``get_latents_npz_path``): lorasmith lists those files and deletes them only on request.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorasmith.cli import app
from lorasmith.errors import UsageError
from lorasmith.ops.cache.datasets import ImageGroup, Settings, check_cacheable, load_dataset_config

runner = CliRunner()


def _config(tmp_path: Path, general: str = "", subset: str = "") -> Path:
    imgs = tmp_path / "imgs"
    imgs.mkdir(exist_ok=True)
    (imgs / "a.png").write_bytes(b"not read")
    cfg = tmp_path / "dataset.toml"
    cfg.write_text(
        f'[general]\n{general}\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "imgs"\n{subset}\n'
    )
    return cfg


def _groups(cfg: Path) -> list[ImageGroup]:
    return load_dataset_config(cfg, Settings((64, 64)))


@pytest.mark.parametrize(
    ("general", "subset", "where", "shown"),
    [
        ("", "random_crop = true", "datasets[0].subsets[0]", "random_crop = true"),
        ("color_aug = true", "", "[general]", "color_aug = true"),
    ],
)
def test_latents_refuse_random_crop_and_color_aug(
    tmp_path: Path, general: str, subset: str, where: str, shown: str
) -> None:
    cfg = _config(tmp_path, general, subset)
    with pytest.raises(UsageError, match=re.escape(f"dataset.toml {where}: {shown}: ")):
        check_cacheable(_groups(cfg), "latents")
    # text caching does not mind either
    check_cacheable(_groups(cfg), "text")


@pytest.mark.parametrize(
    ("subset", "shown"),
    [
        ("shuffle_caption = true", "shuffle_caption = true"),
        ("caption_dropout_rate = 0.1", "caption_dropout_rate = 0.1"),
        ("caption_tag_dropout_rate = 0.05", "caption_tag_dropout_rate = 0.05"),
        ("token_warmup_step = 10", "token_warmup_step = 10"),
    ],
)
def test_text_refuses_what_changes_the_caption_every_step(tmp_path: Path, subset: str, shown: str) -> None:
    cfg = _config(tmp_path, subset=subset)
    with pytest.raises(
        UsageError, match=rf"datasets\[0\].subsets\[0\]: {shown}: it changes the caption"
    ) as info:
        check_cacheable(_groups(cfg), "text")
    assert info.value.hint and "\n" not in info.value.message
    check_cacheable(_groups(cfg), "latents")


def test_zero_rates_and_weighted_captions(tmp_path: Path) -> None:
    # zero is off, as in sd-scripts (token_warmup_step = 0 is the default)
    zero = _config(
        tmp_path, subset="caption_dropout_rate = 0\ntoken_warmup_step = 0\nshuffle_caption = false"
    )
    check_cacheable(_groups(zero), "text")
    # weighted captions are cached (SDXL; cache text refuses the other families itself)
    weighted = _config(tmp_path, general="weighted_captions = true")
    check_cacheable(_groups(weighted), "text")
    wrong = _config(tmp_path, subset='caption_dropout_rate = "high"')
    with pytest.raises(UsageError, match="caption_dropout_rate must be float"):
        _groups(wrong)


def test_cli_refusals_are_one_line_without_traceback(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    pytest.importorskip("PIL")
    from test_cache_latents import _images, _tiny_vae, _write_ckpt

    ckpt = _write_ckpt(tmp_path / "m.safetensors", _tiny_vae(4, True), "first_stage_model.")
    cfg = _config(tmp_path, subset="random_crop = true")
    _images(tmp_path / "imgs", {"a.png": (64, 64)})
    res = runner.invoke(
        app, ["cache", "latents", "--model", str(ckpt), "--arch", "sdxl", "--dataset-config", str(cfg)]
    )
    assert res.exit_code == 2 and "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert (
        lines[0].startswith("error: ")
        and "dataset.toml datasets[0].subsets[0]: random_crop = true" in lines[0]
    )
    assert lines[1].startswith("hint: ") and len(lines) == 2
    assert not list((tmp_path / "imgs").glob("*.npz"))


def test_cli_text_refusal(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from test_cache_text_long import tiny_sdxl

    model = tiny_sdxl(tmp_path / "model")
    cfg = _config(tmp_path, general="shuffle_caption = true")
    args = ["cache", "text", "--model", str(model["path"]), "--arch", "sdxl", "--dataset-config", str(cfg)]
    res = runner.invoke(app, [*args, "--tokenizer", str(model["tok_dir"])])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "error: " in res.output and "[general]: shuffle_caption = true" in res.output


def test_cli_text_refuses_settings_before_reading_encoders(tmp_path: Path) -> None:
    # a missing encoder file and no tokenizer: the dataset setting is still what the run stops on, since
    # the settings are read first (nothing is loaded for a run that the trainer would refuse anyway)
    pytest.importorskip("transformers")
    cfg = _config(tmp_path, subset="caption_dropout_rate = 0.1")
    args = ["cache", "text", "--arch", "sdxl", "--dataset-config", str(cfg)]
    res = runner.invoke(app, [*args, "--text-encoder", str(tmp_path / "missing.safetensors")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "datasets[0].subsets[0]: caption_dropout_rate = 0.1" in res.output
    assert "missing.safetensors" not in res.output and "tokenizer" not in res.output


# ------------------------------------------------------------------------------------- old <stem>.npz
def test_old_npz_files_are_listed_and_removed_only_on_request(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    pytest.importorskip("PIL")
    from test_cache_latents import _images, _tiny_vae, _write_ckpt

    ckpt = _write_ckpt(tmp_path / "m.safetensors", _tiny_vae(4, True), "first_stage_model.")
    data = tmp_path / "data"
    _images(data, {"a.png": (64, 64), "b.png": (64, 64), "c.jpg": (64, 64)})
    (data / "a.npz").write_bytes(b"an old sd-scripts cache")
    (data / "c.npz").write_bytes(b"another")
    args = ["cache", "latents", "--model", str(ckpt), "--arch", "sdxl", "--dataset", str(data)]
    args += ["--resolution", "64", "--latent-dist", "mean"]
    res = runner.invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert (
        payload["old_npz"] == [str(data / "a.npz"), str(data / "c.npz")] and payload["old_npz_removed"] == []
    )
    assert "warning: 2 old <stem>.npz latent files" in res.stderr and "--remove-old-npz" in res.stderr
    assert (data / "a.npz").read_bytes() == b"an old sd-scripts cache"  # untouched
    res = runner.invoke(app, [*args, "--remove-old-npz"])
    assert res.exit_code == 0, res.output
    assert "removed  2 old <stem>.npz latent files" in res.stdout and "warning" not in res.stderr
    assert not (data / "a.npz").exists() and not (data / "c.npz").exists()
    assert (data / "a_0064x0064_sdxl.npz").is_file()  # the new caches stay (skipped as valid)
    assert "3 skipped" in res.stdout


def test_old_npz_only_matter_for_sd_and_sdxl(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    pytest.importorskip("PIL")
    from test_cache_latents import _images, _tiny_vae, _write_ckpt

    from lorasmith.ops.cache.latents import cache_latents

    ckpt = _write_ckpt(tmp_path / "flux.safetensors", _tiny_vae(16, False, seed=1), "vae.")
    data = tmp_path / "data"
    _images(data, {"f.png": (64, 64)})
    (data / "f.npz").write_bytes(b"not looked at by sd-scripts' FLUX strategy")
    r = cache_latents(ckpt, dataset=data, arch="flux", resolution=64, latent_dist="mean", remove_old_npz=True)
    assert r.old_npz == [] and r.old_npz_removed == [] and (data / "f.npz").is_file()
