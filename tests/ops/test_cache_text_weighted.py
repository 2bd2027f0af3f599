"""Weighted SDXL captions (sd-scripts' ``--weighted_captions``) end to end on the tiny SDXL encoders.

Every word of the toy tokenizer is one token, so the ids and weights of a caption are written out here by
hand (``(x)`` 1.1, ``[x]`` ``1 / 1.1``, ``(x:w)`` ``w``). The cached states are the transformers models'
penultimate states of those ids (windows of 77 for 150 tokens, joined) times the weights (1 on BOS, EOS and
padding); ``pool2`` is not weighted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import torch
from test_cache_text import WORDS
from test_cache_text_long import tiny_sdxl

from lorasmith.cli import app
from lorasmith.errors import UsageError
from lorasmith.ops.cache.text import cache_text

runner = CliRunner()

UP = 1.1
DOWN = 1 / 1.1

# 70 plain words, 10 at 1.2 across the first window's end (tokens 71-80), 20 plain: 100 tokens
_WORDS100 = (WORDS * 10)[:100]
LONG = " ".join(_WORDS100[:70]) + " (" + " ".join(_WORDS100[70:80]) + ":1.2) " + " ".join(_WORDS100[80:])

CAPTIONS: dict[str, tuple[str, list[str], list[float]]] = {
    # caption, its words (one token each), the weight of each token
    "a": (
        "a (photo:1.5) of the [red] cat",
        ["a", "photo", "of", "the", "red", "cat"],
        [1, 1.5, 1, 1, DOWN, 1],
    ),
    "b": ("((dog)) sitting on grass", ["dog", "sitting", "on", "grass"], [UP * UP, 1, 1, 1]),
    "c": ("a photo of the blue cat", ["a", "photo", "of", "the", "blue", "cat"], [1.0] * 6),
    "d": (LONG, _WORDS100, [1.0] * 70 + [1.2] * 10 + [1.0] * 20),
}


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return tiny_sdxl(tmp_path_factory.mktemp("sdxl_weighted"))


def _dataset(folder: Path, captions: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, caption in captions.items():
        (folder / f"{stem}.png").write_bytes(b"not read")
        (folder / f"{stem}.txt").write_text(caption + "\n")
    return folder


def _reference(
    sdxl: dict[str, Any], words: list[str], weights: list[float], n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden_state1, hidden_state2, pool2 of a caption of ``words`` weighted ``weights``, n windows."""
    tok = sdxl["tok"]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    toks = [tok.convert_tokens_to_ids(w + "</w>") for w in words][: 75 * n]
    w = torch.tensor([1.0, *weights[: 75 * n], *[1.0] * (75 * n + 1 - len(toks))])
    outs = []
    for model, pad in ((sdxl["clip_l"], eos), (sdxl["clip_g"], 0)):
        seq = [bos, *toks, eos] + [pad] * (75 * n - len(toks))
        windows = []
        for k in range(n):
            body = seq[1 + 75 * k : 76 + 75 * k]
            win = [bos, *body, seq[-1]]
            if pad != eos and body[-1] not in (eos, pad):
                win[-1] = eos
            if pad != eos and body[0] == pad:
                win[1] = eos
            windows.append(win)
        with torch.no_grad():
            out = model(torch.tensor(windows), output_hidden_states=True)
        h = out.hidden_states[-2]
        joined = torch.cat([h[0, :1], *(s[1:76] for s in h), h[-1, -1:]])
        outs.append((joined * w[:, None], out))
    pool2 = outs[1][1].text_embeds[0]
    return outs[0][0], outs[1][0], pool2


@pytest.mark.parametrize("max_tokens", [None, 150])
def test_weighted_sdxl_caches_match_the_hand_derived_weights(
    tmp_path: Path, sdxl: dict[str, Any], max_tokens: int | None
) -> None:
    data = _dataset(tmp_path / "data", {k: v[0] for k, v in CAPTIONS.items()})
    r = cache_text(
        sdxl["path"],
        arch="sdxl",
        dataset=data,
        tokenizers=[sdxl["tok_dir"]],
        max_token_length=max_tokens,
        weighted_captions=True,
        batch_size=3,
    )
    assert (r.written, r.failed, r.weighted_captions) == (4, 0, True)
    n = (max_tokens or 75) // 75
    for stem, (_, words, weights) in CAPTIONS.items():
        with np.load(data / f"{stem}_te_outputs.npz") as npz:
            arrays = {k: npz[k] for k in npz.files}
        assert set(arrays) == {"hidden_state1", "hidden_state2", "pool2"}
        h1, h2, pool2 = _reference(sdxl, words, weights, n)
        assert (
            arrays["hidden_state1"].shape == (75 * n + 2, 64) and arrays["hidden_state1"].dtype == np.float32
        )
        torch.testing.assert_close(torch.from_numpy(arrays["hidden_state1"]), h1, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(arrays["hidden_state2"]), h2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(arrays["pool2"]), pool2, rtol=1e-5, atol=1e-5)


def test_weights_change_only_the_weighted_tokens(tmp_path: Path, sdxl: dict[str, Any]) -> None:
    plain = {"p": "a photo of the red cat"}
    kw: dict[str, Any] = {"arch": "sdxl", "tokenizers": [sdxl["tok_dir"]]}
    cache_text(sdxl["path"], dataset=_dataset(tmp_path / "plain", plain), **kw)
    cache_text(sdxl["path"], dataset=_dataset(tmp_path / "same", plain), weighted_captions=True, **kw)
    weighted = {"p": "a photo of the (red:2) cat"}
    cache_text(sdxl["path"], dataset=_dataset(tmp_path / "w", weighted), weighted_captions=True, **kw)
    with (
        np.load(tmp_path / "plain" / "p_te_outputs.npz") as a,
        np.load(tmp_path / "same" / "p_te_outputs.npz") as b,
        np.load(tmp_path / "w" / "p_te_outputs.npz") as c,
    ):
        # a caption without the syntax caches exactly as unweighted
        for key in ("hidden_state1", "hidden_state2", "pool2"):
            assert np.array_equal(a[key], b[key])
        # the same tokens: only "red" (position 5 after BOS) is doubled, pool2 is untouched
        for key in ("hidden_state1", "hidden_state2"):
            np.testing.assert_allclose(c[key][5], 2 * a[key][5], rtol=1e-6)
            assert np.array_equal(np.delete(c[key], 5, axis=0), np.delete(a[key], 5, axis=0))
        assert np.array_equal(c["pool2"], a["pool2"])


def test_half_precision_follows_sd_scripts_products(tmp_path: Path, sdxl: dict[str, Any]) -> None:
    # float32 weights promote the 77-token product to float32; for 150 / 225 it goes back into the states
    kw: dict[str, Any] = {"arch": "sdxl", "tokenizers": [sdxl["tok_dir"]], "dtype": "float16"}
    short = cache_text(
        sdxl["path"], dataset=_dataset(tmp_path / "s", {"a": CAPTIONS["a"][0]}), weighted_captions=True, **kw
    )
    long = cache_text(
        sdxl["path"],
        dataset=_dataset(tmp_path / "l", {"a": CAPTIONS["a"][0]}),
        weighted_captions=True,
        max_token_length=150,
        **kw,
    )
    assert short.written == long.written == 1
    with (
        np.load(tmp_path / "s" / "a_te_outputs.npz") as s,
        np.load(tmp_path / "l" / "a_te_outputs.npz") as ln,
    ):
        assert s["hidden_state1"].dtype == np.float32 and s["pool2"].dtype == np.float16
        assert ln["hidden_state1"].dtype == np.float16 and ln["hidden_state2"].dtype == np.float16


def test_weighted_captions_from_the_toml_and_the_cli(tmp_path: Path, sdxl: dict[str, Any]) -> None:
    _dataset(tmp_path / "imgs", {"a": CAPTIONS["a"][0], "bad": "a (cat:1.2.3)"})
    cfg = tmp_path / "dataset.toml"
    cfg.write_text(
        '[general]\nweighted_captions = true\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "imgs"\n'
    )
    args = ["cache", "text", "--model", str(sdxl["path"]), "--arch", "sdxl", "--dataset-config", str(cfg)]
    args += ["--tokenizer", str(sdxl["tok_dir"])]
    res = runner.invoke(app, [*args, "--json"])
    assert res.exit_code == 1, res.output  # the unparsable caption fails that image only
    payload = json.loads(res.stdout)
    assert payload["weighted_captions"] is True and (payload["written"], payload["failed"]) == (1, 1)
    bad = next(it for it in payload["items"] if it["status"] == "failed")
    assert bad["error"].startswith(str(tmp_path / "imgs" / "bad.txt") + ": weighted caption: weight '1.2.3'")
    h1, _, _ = _reference(sdxl, CAPTIONS["a"][1], CAPTIONS["a"][2], 1)
    with np.load(tmp_path / "imgs" / "a_te_outputs.npz") as npz:
        torch.testing.assert_close(torch.from_numpy(npz["hidden_state1"]), h1, rtol=1e-5, atol=1e-5)
    # the option may repeat the TOML, not contradict it
    res = runner.invoke(app, [*args, "--weighted-captions"])
    assert res.exit_code == 1 and "1 skipped" in res.stdout
    off = tmp_path / "off.toml"
    off.write_text(
        '[general]\nweighted_captions = false\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "imgs"\n'
    )
    args[args.index(str(cfg))] = str(off)
    res = runner.invoke(app, [*args, "--weighted-captions"])
    assert res.exit_code == 2 and "off.toml [general]: weighted_captions = false contradicts" in res.output


def test_one_value_per_run(tmp_path: Path, sdxl: dict[str, Any]) -> None:
    data = _dataset(tmp_path / "imgs", {"a": "a cat"})
    two = tmp_path / "two.toml"
    two.write_text(
        f'[[datasets]]\nweighted_captions = true\n[[datasets.subsets]]\nimage_dir = "{data}"\n'
        f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{data}"\n'
    )
    with pytest.raises(UsageError, match="weighted_captions differs between datasets"):
        cache_text(sdxl["path"], arch="sdxl", dataset_config=two, tokenizers=[sdxl["tok_dir"]])
    assert not list(data.glob("*.npz"))


@pytest.mark.parametrize("arch", ["flux", "sd3", "zimage"])
def test_other_families_refuse_weighted_captions(tmp_path: Path, sdxl: dict[str, Any], arch: str) -> None:
    data = _dataset(tmp_path / "imgs", {"a": "a (cat)"})
    args = ["cache", "text", "--arch", arch, "--dataset", str(data), "--tokenizer", str(sdxl["tok_dir"])]
    res = runner.invoke(app, [*args, "--weighted-captions"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "weighted captions apply to SDXL only" in res.output and arch in res.output
    assert "hint: drop it" in res.output
    cfg = tmp_path / "dataset.toml"
    cfg.write_text(f'[[datasets]]\nweighted_captions = true\n[[datasets.subsets]]\nimage_dir = "{data}"\n')
    with pytest.raises(UsageError, match=r"dataset.toml datasets\[0\]: weighted captions apply to SDXL only"):
        cache_text(None, arch=arch, dataset_config=cfg, tokenizers=[sdxl["tok_dir"]])
