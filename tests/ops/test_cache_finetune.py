"""Fine-tuning datasets (``metadata_file``): sd-scripts' ``FineTuningDataset`` rules, by hand.

The metadata JSON is what sd-scripts' ``finetune/`` scripts write: image key (a stem, or a path with
``--full_path``) -> ``caption``, ``tags``, ``train_resolution``. The references below are written from the
rules: a key is found as a path, else as ``image_dir/<key><ext>`` (extensions in lower or upper case, the
first in sorted order); the caption is ``caption + separator + tags`` (only tags: the tags); the latent
cache is named after ``train_resolution``, which is also the bucket when every image has one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from lorasmith.cli import app
from lorasmith.errors import InvalidFileError, UsageError
from lorasmith.ops.cache.datasets import (
    Settings,
    load_dataset_config,
    metadata_caption,
    metadata_image,
)

runner = CliRunner()


def _touch(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"not read")


def _ft_config(tmp_path: Path, metadata: dict[str, Any], extra: str = "", general: str = "") -> Path:
    (tmp_path / "meta.json").write_text(json.dumps(metadata), encoding="utf-8")
    cfg = tmp_path / "ft.toml"
    cfg.write_text(
        f'[general]\n{general}\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "imgs"\n'
        f'metadata_file = "meta.json"\n{extra}\n'
    )
    return cfg


# ------------------------------------------------------------------------------------------- captions
@pytest.mark.parametrize(
    ("caption", "tags", "expected"),
    [
        ("a photo of a cat", None, "a photo of a cat"),
        (None, "cat, red", "cat, red"),  # only tags: they are the caption
        ("a photo of a cat", "cat, red", "a photo of a cat,cat, red"),  # joined by "," and nothing else
        ("a photo", "", "a photo"),  # empty tags add nothing
        ("", "cat", ",cat"),  # an empty caption is still a caption
        (None, None, ""),
        ("line one\nline two", "cat", "line one\nline two,cat"),  # multi-line captions stay so
        (None, "cat\ndog", "cat\ndog"),
    ],
)
def test_metadata_caption(caption: str | None, tags: str | None, expected: str) -> None:
    assert metadata_caption(caption, tags) == expected


def test_metadata_caption_separator_and_wildcard() -> None:
    assert metadata_caption("a cat", "red", separator=" | ") == "a cat | red"
    # enable_wildcard: the tags (newlines made separators) follow every non-empty line of the caption
    assert metadata_caption("one\n\n two \n", "red\nblue", wildcard=True) == "one,red,blue\n two ,red,blue"
    assert metadata_caption(None, "red\nblue", wildcard=True) == "red\nblue"  # tags alone stay as written
    assert metadata_caption("one\ntwo", None, wildcard=True) == "one\ntwo"
    assert metadata_caption("one", "", wildcard=True) == "one,"


# ------------------------------------------------------------------------------------------- images
def test_metadata_image_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    imgs = tmp_path / "imgs"
    _touch(imgs, ["a.png", "a.jpg", "b.webp", "C.PNG", "d.Png", "sub/e.png", "f.png"])
    # a stem key: every extension in lower and upper case, the first in sorted order
    assert metadata_image("a", imgs) == imgs / "a.jpg"
    assert metadata_image("b", imgs) == imgs / "b.webp"
    assert metadata_image("C", imgs) == imgs / "C.PNG"
    assert metadata_image("d", imgs) is None  # mixed case is not globbed by sd-scripts
    assert metadata_image("sub/e", imgs) == imgs / "sub" / "e.png"
    # a key with its extension is found as a path only (absolute, or relative to the current folder)
    assert metadata_image("f.png", imgs) is None
    assert metadata_image(str(imgs / "f.png"), None) == imgs / "f.png"
    monkeypatch.chdir(tmp_path)
    assert metadata_image("imgs/f.png", None) == Path("imgs/f.png")
    assert metadata_image("missing", imgs) is None


# --------------------------------------------------------------------------------------- the config
def test_fine_tuning_subset_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    imgs = tmp_path / "imgs"
    _touch(imgs, ["b.png", "a.jpg", "full.png"])
    metadata = {
        "b": {"caption": "a photo of the cat", "tags": "red, dog", "train_resolution": [64, 48]},
        "a": {"tags": "blue"},
        str(imgs / "full.png"): {"caption": "full path", "other": 1},
    }
    cfg = _ft_config(tmp_path, metadata, extra='caption_separator = "; "\nflip_aug = true')
    monkeypatch.chdir(tmp_path.parent)  # relative names are found next to the TOML
    (group,) = load_dataset_config(cfg, Settings((64, 64)))
    # the metadata file's order, not sorted
    assert group.images == (imgs / "b.png", imgs / "a.jpg", imgs / "full.png")
    assert [e.caption for e in group.entries] == ["a photo of the cat; red, dog", "blue", "full path"]
    assert [e.train_resolution for e in group.entries] == [(64, 48), None, None]
    assert group.metadata_file == tmp_path / "meta.json" and group.settings.flip
    assert not group.metadata_buckets  # two images have no train_resolution


def test_metadata_buckets_and_bucket_no_upscale(tmp_path: Path) -> None:
    _touch(tmp_path / "imgs", ["a.png", "b.png"])
    metadata = {
        "a": {"caption": "x", "train_resolution": [64, 48]},
        "b": {"tags": "y", "train_resolution": [48, 64]},
    }
    cfg = _ft_config(tmp_path, metadata)
    (group,) = load_dataset_config(cfg, Settings((64, 64)))
    assert group.metadata_buckets
    cfg = _ft_config(tmp_path, metadata, general="enable_bucket = true\nbucket_no_upscale = true")
    with pytest.raises(UsageError, match=r"ft.toml \[general\]: bucket_no_upscale = true with .*meta.json"):
        load_dataset_config(cfg, Settings((64, 64)))


def test_fine_tuning_subsets_left_out_as_in_sd_scripts(tmp_path: Path) -> None:
    _touch(tmp_path / "imgs", ["a.png"])
    (tmp_path / "meta.json").write_text(json.dumps({"a": {"caption": "x"}}))
    (tmp_path / "empty.json").write_text("{}")
    cfg = tmp_path / "ft.toml"
    sub = '[[datasets.subsets]]\nimage_dir = "imgs"\nmetadata_file = "{}"\n'
    cfg.write_text(
        "[[datasets]]\n"
        + sub.format("meta.json")
        + sub.format("meta.json")  # the same metadata file again: the first wins
        + sub.format("empty.json")  # no entries: left out
        + sub.format("meta.json").replace("imgs", "other")  # still the same metadata file
        + "[[datasets]]\n"
        + sub.format("meta.json")
        + "num_repeats = 0\n"
    )
    groups = load_dataset_config(cfg, Settings((64, 64)))
    assert [g.source.split(" ")[-1] for g in groups] == ["datasets[0].subsets[0]"]


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        (
            {"missing": {"caption": "x"}},
            r"meta.json \['missing'\]: no image \(neither the path 'missing' nor ",
        ),
        ({"a": {"caption": 3}}, r"meta.json \['a'\]: caption must be a string, got int"),
        ({"a": {"tags": ["x"]}}, r"tags must be a string, got list"),
        ({"a": {"train_resolution": [64]}}, r"train_resolution must be \[W, H\], got \[64\]"),
        ({"a": {"train_resolution": [60, 64]}}, r"train_resolution 60x64 is not a multiple of 8"),
        ({"a": "x"}, r"\['a'\]: not a JSON object"),
        (["a"], r"not a JSON object of image keys"),
    ],
)
def test_bad_metadata(tmp_path: Path, metadata: Any, message: str) -> None:
    _touch(tmp_path / "imgs", ["a.png"])
    cfg = _ft_config(tmp_path, metadata)
    with pytest.raises(InvalidFileError, match=message) as info:
        load_dataset_config(cfg, Settings((64, 64)))
    assert info.value.hint and "\n" not in info.value.message


def test_missing_and_invalid_metadata_files(tmp_path: Path) -> None:
    _touch(tmp_path / "imgs", ["a.png", "only.npz"])
    cfg = _ft_config(tmp_path, {"only": {"caption": "x"}})
    # sd-scripts would train from prepare_buckets_latents.py's npz: lorasmith needs the image
    with pytest.raises(InvalidFileError, match=r"\['only'\]: no image") as info:
        load_dataset_config(cfg, Settings((64, 64)))
    assert "only.npz" in (info.value.hint or "")
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(InvalidFileError, match="not valid JSON"):
        load_dataset_config(cfg, Settings((64, 64)))
    (tmp_path / "meta.json").unlink()
    with pytest.raises(InvalidFileError, match=r"subsets\[0\]: metadata_file .*meta.json not found"):
        load_dataset_config(cfg, Settings((64, 64)))


def test_dreambooth_and_fine_tuning_subsets_do_not_mix(tmp_path: Path) -> None:
    _touch(tmp_path / "imgs", ["a.png"])
    (tmp_path / "meta.json").write_text(json.dumps({"a": {"caption": "x"}}))
    cfg = tmp_path / "mixed.toml"
    cfg.write_text(
        '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "imgs"\nmetadata_file = "meta.json"\n'
        '[[datasets.subsets]]\nimage_dir = "imgs"\n'
    )
    with pytest.raises(UsageError, match=r"mixed.toml datasets\[0\]: DreamBooth subsets .* in one dataset"):
        load_dataset_config(cfg, Settings((64, 64)))


# ------------------------------------------------------------------------------------------ latents
def test_latents_follow_train_resolution(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    pytest.importorskip("PIL")
    import torch
    from test_cache_latents import _direct, _images, _tiny_vae, _write_ckpt

    from lorasmith.ops.cache.buckets import Placement, crop_ltrb
    from lorasmith.ops.cache.latents import cache_latents, prepare_image

    vae = _tiny_vae(4, True)
    ckpt = _write_ckpt(tmp_path / "m.safetensors", vae, "first_stage_model.")

    def latents(image: Path, placement: Placement) -> torch.Tensor:
        pixels, _ = prepare_image(image, placement, False)
        return _direct(vae, pixels)

    # every image has a train_resolution: it is the bucket, whatever the dataset's own bucket settings
    root = tmp_path / "every"
    imgs = root / "imgs"
    _images(imgs, {"a.png": (96, 64), "b.png": (64, 96)})
    every = {
        "a": {"caption": "x", "train_resolution": [64, 64]},  # not the image's aspect ratio: scaled to it
        "b": {"caption": "y", "train_resolution": [64, 96]},
    }
    cfg = _ft_config(root, every, general="resolution = 32")
    r = cache_latents(ckpt, dataset_config=cfg, arch="sdxl", latent_dist="mean")
    assert (r.written, r.failed) == (2, 0) and r.buckets == {"64x64": 1, "64x96": 1}
    with np.load(imgs / "a_0064x0064_sdxl.npz") as npz:
        # original_size and crop_ltrb from the image as loaded; bucket, resize and name from the metadata
        assert npz["original_size"].tolist() == [96, 64]
        assert npz["crop_ltrb"].tolist() == list(crop_ltrb((64, 64), (96, 64)))
        ref = latents(imgs / "a.png", Placement((64, 64), (64, 64), (0, 0, 0, 0)))
        torch.testing.assert_close(torch.from_numpy(npz["latents"]), ref, rtol=1e-5, atol=1e-5)
    with np.load(imgs / "b_0064x0096_sdxl.npz") as npz:
        assert npz["latents"].shape == (4, 12, 8) and npz["original_size"].tolist() == [64, 96]

    # one image without: the dataset's buckets (here the one 64x64), train_resolution still the size
    root = tmp_path / "mixed"
    imgs = root / "imgs"
    _images(imgs, {"a.png": (96, 64), "c.png": (128, 128)})
    mixed = {"a": {"caption": "x", "train_resolution": [64, 96]}, "c": {"caption": "z"}}
    cfg = _ft_config(root, mixed, general="resolution = 64")
    r = cache_latents(ckpt, dataset_config=cfg, arch="sdxl", latent_dist="mean")
    assert (r.written, r.failed) == (2, 0) and r.buckets == {"64x64": 2}
    with np.load(imgs / "a_0064x0096_sdxl.npz") as npz:
        # 64x96 covers the bucket at scale 1: the 96x64 image is scaled to 64x96, then 16 rows cropped
        ref = latents(imgs / "a.png", Placement((64, 64), (64, 96), (0, 0, 0, 0)))
        torch.testing.assert_close(torch.from_numpy(npz["latents"]), ref, rtol=1e-5, atol=1e-5)
        assert npz["original_size"].tolist() == [96, 64]
        assert npz["crop_ltrb"].tolist() == list(crop_ltrb((64, 64), (96, 64)))
    assert (imgs / "c_0128x0128_sdxl.npz").is_file()


def test_zimage_refuses_fine_tuning_subsets(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    pytest.importorskip("PIL")
    from test_cache_latents import _images, _tiny_vae, _write_ckpt

    ckpt = _write_ckpt(tmp_path / "zi.safetensors", _tiny_vae(16, False, seed=1), "vae.")
    _images(tmp_path / "imgs", {"a.png": (64, 64)})
    cfg = _ft_config(tmp_path, {"a": {"caption": "x"}})
    args = ["cache", "latents", "--model", str(ckpt), "--arch", "zimage", "--dataset-config", str(cfg)]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "metadata_file: musubi-tuner has no fine-tuning datasets for zimage" in res.output
    assert not list((tmp_path / "imgs").glob("*.safetensors"))


# --------------------------------------------------------------------------------------------- text
def test_text_caches_the_metadata_caption(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from test_cache_text_long import tiny_sdxl

    model = tiny_sdxl(tmp_path / "model")
    _touch(tmp_path / "imgs", ["a.png", "b.png", "nothing.png"])
    cfg = _ft_config(
        tmp_path,
        {
            "a": {"caption": "a photo of the cat", "tags": "red, dog", "train_resolution": [64, 64]},
            "b": {"tags": "blue dog"},
            "nothing": {"train_resolution": [64, 64]},
        },
    )
    # the same captions as DreamBooth caption files, for comparison
    _touch(tmp_path / "db", ["a.png", "b.png"])
    (tmp_path / "db" / "a.txt").write_text("a photo of the cat,red, dog")
    (tmp_path / "db" / "b.txt").write_text("blue dog")
    base = [
        "cache",
        "text",
        "--model",
        str(model["path"]),
        "--arch",
        "sdxl",
        "--tokenizer",
        str(model["tok_dir"]),
    ]
    res = runner.invoke(app, [*base, "--dataset-config", str(cfg), "--json"])
    assert res.exit_code == 1, res.output  # the entry without caption and tags fails
    payload = json.loads(res.stdout)
    items = {Path(it["image"]).name: it for it in payload["items"]}
    assert items["a.png"]["caption"] == "a photo of the cat,red, dog"
    assert items["a.png"]["caption_file"] == str(tmp_path / "meta.json")
    assert not items["a.png"]["from_class_tokens"] and items["b.png"]["caption"] == "blue dog"
    assert items["nothing.png"]["status"] == "failed"
    assert "meta.json ['nothing']: no caption and no tags" in items["nothing.png"]["error"]
    res = runner.invoke(app, [*base, "--dataset", str(tmp_path / "db"), "--caption-extension", ".txt"])
    assert res.exit_code == 0, res.output
    for stem in ("a", "b"):
        with (
            np.load(tmp_path / "imgs" / f"{stem}_te_outputs.npz") as ft,
            np.load(tmp_path / "db" / f"{stem}_te_outputs.npz") as db,
        ):
            for key in ("hidden_state1", "hidden_state2", "pool2"):
                np.testing.assert_array_equal(ft[key], db[key])
    # musubi-tuner has no fine-tuning datasets
    zimage = ["cache", "text", "--arch", "zimage", "--tokenizer", "x", "--dataset-config", str(cfg)]
    res = runner.invoke(app, zimage)
    assert res.exit_code == 2 and "musubi-tuner has no fine-tuning datasets" in res.output
