"""``cache text`` on DreamBooth datasets: the captions sd-scripts would encode.

sd-scripts' DreamBooth rules (``train_util.DreamBoothDataset``, ``config_util``): a caption file's first
line; without one, the subset's ``class_tokens``, which ``--train_data_dir`` takes from folder names
``<repeats>_<class tokens>``; ``caption_extension`` with or without its dot; the caption of a face-crop
name ``<name>_<x>_<y>_<w>_<h>`` from ``<name>.<ext>``; ``enable_wildcard`` keeping every non-empty line;
subsets without repeats, and repeated folders, left out. The caption rules are checked on the job plan
(no encoder needed); one run through a tiny SDXL checks that the class tokens are what gets encoded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from lorasmith.cli import app
from lorasmith.ops.cache.datasets import Settings, dreambooth_folder, folder_groups, load_dataset_config
from lorasmith.ops.cache.text import TEXT_FAMILIES, TextCacheItem, plan_text_jobs

runner = CliRunner()


def _touch(folder: Path, names: list[str], captions: dict[str, str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"not read")
    for name, text in (captions or {}).items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def _plan(groups: Any, dreambooth: bool = True) -> dict[str, TextCacheItem]:
    items, _ = plan_text_jobs(
        groups, TEXT_FAMILIES["sdxl"], lambda jobs: [False] * len(jobs), True, False, dreambooth=dreambooth
    )
    return {Path(it.image).name: it for it in items}


def test_folder_names_give_repeats_and_class_tokens() -> None:
    assert dreambooth_folder("10_sks dog") == (10, "sks dog")
    assert dreambooth_folder("10_sks_dog") == (10, "sks_dog")  # the rest joined by "_" again
    assert dreambooth_folder("5_") == (5, "")
    assert dreambooth_folder("0_cat") == (0, "cat")
    assert dreambooth_folder("cat") is None and dreambooth_folder("x_10_cat") is None


def test_dataset_folder_class_tokens_from_subfolders(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _touch(data, ["top.png"], {"top.caption": "the top caption\nsecond line"})
    _touch(data / "10_red dog", ["a.png", "b.png"], {"b.txt": "  a photo of the dog \n"})
    _touch(data / "3_blue_cat", ["c.png"])
    _touch(data / "0_ignored", ["z.png"])  # no repeats: not a DreamBooth folder, no class tokens
    _touch(data / "misc", ["d.png"])
    items = _plan(folder_groups(data, Settings((64, 64), caption_extension="")))
    assert set(items) == {"top.png", "a.png", "b.png", "c.png", "z.png", "d.png"}
    assert (items["top.png"].caption, items["top.png"].from_class_tokens) == ("the top caption", False)
    assert (items["a.png"].caption, items["a.png"].from_class_tokens) == ("red dog", True)
    assert items["a.png"].caption_file is None and items["a.png"].status == "written"
    assert (items["b.png"].caption, items["b.png"].caption_file) == (
        "a photo of the dog",
        str(data / "10_red dog" / "b.txt"),
    )
    assert items["c.png"].caption == "blue_cat"
    for name in ("z.png", "d.png"):
        assert items[name].status == "failed" and "no caption file" in (items[name].error or "")


def test_toml_subsets_class_tokens_extension_repeats_and_duplicates(tmp_path: Path) -> None:
    _touch(tmp_path / "imgs", ["a.png", "b.png"], {"b.caption": "from the caption file", "a.txt": "not read"})
    _touch(tmp_path / "reg", ["r.png"])
    _touch(tmp_path / "skip", ["s.png"])
    cfg = tmp_path / "dataset.toml"
    cfg.write_text(
        '[general]\nclass_tokens = "general tokens"\n'
        "[[datasets]]\nresolution = 64\n"
        '[[datasets.subsets]]\nimage_dir = "imgs"\nclass_tokens = "blue cat"\ncaption_extension = "caption"\n'
        '[[datasets.subsets]]\nimage_dir = "imgs"\nclass_tokens = "second subset of imgs"\n'
        '[[datasets.subsets]]\nimage_dir = "reg"\nis_reg = true\nnum_repeats = 2\n'
        '[[datasets.subsets]]\nimage_dir = "skip"\nnum_repeats = 0\nclass_tokens = "never"\n'
    )
    groups = load_dataset_config(cfg, Settings((64, 64), caption_extension=""))
    assert [g.source for g in groups] == [f"{cfg} datasets[0].subsets[0]", f"{cfg} datasets[0].subsets[2]"]
    items = _plan(groups)
    assert set(items) == {"a.png", "b.png", "r.png"}  # "skip" has no repeats; "imgs" is cached once
    assert (items["a.png"].caption, items["a.png"].from_class_tokens) == ("blue cat", True)
    assert items["b.png"].caption == "from the caption file"  # "caption" read as ".caption"
    assert items["r.png"].caption == "general tokens"  # a regularisation subset reads captions the same way


def test_face_crop_names_wildcards_and_empty_captions(tmp_path: Path) -> None:
    data = _touch(
        tmp_path / "data",
        ["face_120_80_40_40.png", "wild.png", "blank.png", "empty.png", "b_om.png"],
        {
            "face.txt": "caption of the face crops",
            "wild.txt": "first {a|b}\n\n  second  \n",
            "blank.txt": "\nsecond line only",
            "empty.txt": "",
            "b_om.txt": "\ufeffbom kept, as sd-scripts reads utf-8",
        },
    )
    plain = Settings((64, 64), caption_extension=".txt")
    items = _plan(folder_groups(data, plain))
    assert items["face_120_80_40_40.png"].caption == "caption of the face crops"
    assert items["face_120_80_40_40.png"].caption_file == str(data / "face.txt")
    assert items["wild.png"].caption == "first {a|b}"
    for name in ("blank.png", "empty.png"):
        # sd-scripts would encode "" (or stop); lorasmith leaves the image to the trainer
        assert items[name].status == "failed" and "caption file is empty" in (items[name].error or "")
    assert items["b_om.png"].caption == "\ufeffbom kept, as sd-scripts reads utf-8"
    wild = _plan(folder_groups(data, Settings((64, 64), caption_extension=".txt", enable_wildcard=True)))
    assert wild["wild.png"].caption == "first {a|b}\nsecond"
    # musubi-tuner (Z-Image) knows no class tokens and no face-crop names
    _touch(data / "10_red dog", ["x.png"])
    musubi = _plan(folder_groups(data, plain), dreambooth=False)
    assert musubi["face_120_80_40_40.png"].status == "failed" and musubi["x.png"].status == "failed"


# ------------------------------------------------------------------------------------------ end to end
def test_class_tokens_are_what_is_encoded(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from test_cache_text_long import tiny_sdxl

    model = tiny_sdxl(tmp_path / "model")
    data = tmp_path / "data"
    _touch(data / "5_red dog", ["a.png"])
    _touch(data / "plain", ["b.png"], {"b.txt": "red dog"})
    args = ["cache", "text", "--model", str(model["path"]), "--arch", "sdxl", "--dataset", str(data)]
    res = runner.invoke(app, [*args, "--tokenizer", str(model["tok_dir"]), "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    by_name = {Path(it["image"]).name: it for it in payload["items"]}
    assert by_name["a.png"]["from_class_tokens"] and by_name["a.png"]["caption"] == "red dog"
    with (
        np.load(data / "5_red dog" / "a_te_outputs.npz") as a,
        np.load(data / "plain" / "b_te_outputs.npz") as b,
    ):
        for key in ("hidden_state1", "hidden_state2", "pool2"):
            np.testing.assert_array_equal(a[key], b[key])
