"""``cache text`` for SDXL with ``max_token_length`` 150 / 225: captions split into 77-token windows.

The windows are derived here from their description (sd-scripts' ``_get_input_ids`` and
``_get_hidden_states_sdxl``), on the tiny CLIP tokenizer of ``test_cache_text``: BOS, the next 75
positions of the padded caption, and the caption's last id; CLIP-G (padded with 0, not EOS) ends a window
whose text runs on with EOS and starts an empty one with ``BOS EOS``. Each window goes through the
transformers models on its own; the states are joined as BOS, 75 inner states per window, last state.
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
from test_cache_text import WORDS, _clip, _clip_tokenizer_dir, _hf_clip_state, _prefixed, _to_openclip
from transformers import CLIPTokenizer

from lorasmith.cli import app
from lorasmith.errors import UsageError
from lorasmith.io.writer import save_file
from lorasmith.ops.cache.text import cache_text, chunk_token_ids

runner = CliRunner()


# ------------------------------------------------------------------------------------ windows by hand
def test_windows_of_a_tokenizer_that_pads_with_eos() -> None:
    # window 7 (5 inner ids), BOS 8, EOS 9 = pad: two windows, each closed by the sequence's last id
    ids = [8, 1, 2, 3, 4, 5, 6, 7, 9, 9, 9, 9]
    assert chunk_token_ids(ids, 7, eos=9, pad=9) == [[8, 1, 2, 3, 4, 5, 9], [8, 6, 7, 9, 9, 9, 9]]


def test_windows_of_a_tokenizer_that_pads_with_zero() -> None:
    # text running past window 0 gets an EOS there; the padding stays 0
    ids = [8, 1, 2, 3, 4, 5, 6, 7, 9, 0, 0, 0]
    assert chunk_token_ids(ids, 7, eos=9, pad=0) == [[8, 1, 2, 3, 4, 5, 9], [8, 6, 7, 9, 0, 0, 0]]
    # windows without text start BOS EOS
    short = [8, 1, 2, 3, 9] + [0] * 12
    assert chunk_token_ids(short, 7, eos=9, pad=0) == [
        [8, 1, 2, 3, 9, 0, 0],
        [8, 9, 0, 0, 0, 0, 0],
        [8, 9, 0, 0, 0, 0, 0],
    ]
    # a caption filling every position (or truncated there) ends in EOS, which closes every window
    full = [8, *range(10, 20), 9]
    assert chunk_token_ids(full, 7, eos=9, pad=0) == [[8, 10, 11, 12, 13, 14, 9], [8, 15, 16, 17, 18, 19, 9]]
    # text ending exactly at a window's end: EOS is the next window's first inner id
    edge = [8, 1, 2, 3, 4, 5, 9, 0, 0, 0, 0, 0]
    assert chunk_token_ids(edge, 7, eos=9, pad=0) == [[8, 1, 2, 3, 4, 5, 9], [8, 9, 0, 0, 0, 0, 0]]


def _reference_windows(tok: Any, caption: str, n: int, pad: int) -> torch.Tensor:
    """The n windows of 77 ids of ``caption``, written from the rule (not from the tokenizer's padding)."""
    bos, eos = tok.bos_token_id, tok.eos_token_id
    content = tok(caption)["input_ids"][1:-1][: n * 75]  # truncation keeps n * 75 tokens and the EOS
    seq = content + [eos] + [pad] * (n * 75)
    last = eos if len(content) == n * 75 else pad  # the last id of the padded caption
    windows = []
    for k in range(n):
        body = seq[75 * k : 75 * k + 75]
        w = [bos, *body, last]
        if pad != eos and body[-1] not in (eos, pad):
            w[-1] = eos
        if pad != eos and body[0] == pad:
            w[1] = eos
        windows.append(w)
    return torch.tensor(windows)


def _joined(states: torch.Tensor) -> torch.Tensor:
    """(n, 77, C) window states -> (75 n + 2, C): first BOS, the 75 inner states of each, last state."""
    return torch.cat([states[0, :1], *(s[1:76] for s in states), states[-1, -1:]])


# ----------------------------------------------------------------------------------------- end to end
def tiny_sdxl(root: Path) -> dict[str, Any]:
    """A tiny SDXL checkpoint (CLIP-L and OpenCLIP bigG layouts), its tokenizer folder and its encoders."""
    root.mkdir(parents=True, exist_ok=True)
    tok_dir = _clip_tokenizer_dir(root / "tok")
    tok = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    clip_l = _clip(tok, 64, "quick_gelu", None, 10)
    clip_g = _clip(tok, 128, "gelu", 96, 11)
    tensors = _prefixed("conditioner.embedders.0.transformer.", _hf_clip_state(clip_l))
    tensors |= _prefixed("conditioner.embedders.1.model.", _to_openclip(_hf_clip_state(clip_g)))
    tensors["model.diffusion_model.out.2.weight"] = torch.zeros(4, 8, 3, 3)
    path = root / "sdxl.safetensors"
    save_file(tensors, path, hashes=False)
    return {"path": path, "tok_dir": tok_dir, "tok": tok, "clip_l": clip_l, "clip_g": clip_g}


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return tiny_sdxl(tmp_path_factory.mktemp("sdxl_long"))


CAPTIONS = {
    "short": "a photo of the red cat",
    "long": " ".join((WORDS * 10)[:100]),  # 100 tokens: two windows, the second partly empty
    "huge": " ".join((WORDS * 30)[:260]),  # truncated at 225 (and at 150)
}


def _dataset(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, caption in CAPTIONS.items():
        (folder / f"{stem}.png").write_bytes(b"not read")
        (folder / f"{stem}.txt").write_text(caption)
    return folder


@pytest.mark.parametrize("max_tokens", [150, 225])
def test_sdxl_long_captions_match_the_windowed_encoding(
    tmp_path: Path, sdxl: dict[str, Any], max_tokens: int
) -> None:
    data = _dataset(tmp_path / "data")
    r = cache_text(
        sdxl["path"],
        arch="sdxl",
        dataset=data,
        tokenizers=[sdxl["tok_dir"]],
        max_token_length=max_tokens,
        batch_size=2,
    )
    assert (r.written, r.failed, r.max_token_length) == (3, 0, max_tokens)
    n = max_tokens // 75
    tok = sdxl["tok"]
    for stem, caption in CAPTIONS.items():
        with np.load(data / f"{stem}_te_outputs.npz") as npz:
            arrays = {k: npz[k] for k in npz.files}
        assert arrays["hidden_state1"].shape == (max_tokens + 2, 64)
        assert arrays["hidden_state2"].shape == (max_tokens + 2, 128)
        assert arrays["pool2"].shape == (96,)
        w1 = _reference_windows(tok, caption, n, pad=tok.eos_token_id)  # CLIP-L pads with EOS
        w2 = _reference_windows(tok, caption, n, pad=0)  # sd-scripts pads CLIP-G with 0
        with torch.no_grad():
            h1 = sdxl["clip_l"](w1, output_hidden_states=True).hidden_states[-2]
            out2 = sdxl["clip_g"](w2, output_hidden_states=True)
        torch.testing.assert_close(
            torch.from_numpy(arrays["hidden_state1"]), _joined(h1), rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(
            torch.from_numpy(arrays["hidden_state2"]), _joined(out2.hidden_states[-2]), rtol=1e-5, atol=1e-5
        )
        # pool2 is the first window's projected state at its first EOS
        torch.testing.assert_close(
            torch.from_numpy(arrays["pool2"]), out2.text_embeds[0], rtol=1e-5, atol=1e-5
        )


def test_window_facts_of_the_toy_captions(sdxl: dict[str, Any]) -> None:
    tok = sdxl["tok"]
    eos = tok.eos_token_id
    long_windows = _reference_windows(tok, CAPTIONS["long"], 3, pad=0)
    # 100 tokens: window 0 is full and closed by EOS, window 1 holds 25 tokens then EOS, window 2 is empty
    assert long_windows[0, -1] == eos and long_windows[1, 26] == eos and long_windows[1, -1] == 0
    assert long_windows[2, :3].tolist() == [tok.bos_token_id, eos, 0]
    assert _reference_windows(tok, CAPTIONS["huge"], 3, pad=0)[2, -1] == eos


def test_a_77_token_cache_is_stale_for_225(tmp_path: Path, sdxl: dict[str, Any]) -> None:
    data = _dataset(tmp_path / "data")
    kw: dict[str, Any] = {"arch": "sdxl", "dataset": data, "tokenizers": [sdxl["tok_dir"]]}
    assert cache_text(sdxl["path"], **kw).written == 3
    r = cache_text(sdxl["path"], max_token_length=225, **kw)
    assert r.failed == 3 and "--overwrite" in (r.items[0].error or "")
    assert cache_text(sdxl["path"], max_token_length=225, overwrite=True, **kw).written == 3
    assert cache_text(sdxl["path"], max_token_length=225, **kw).skipped == 3
    # 75 is the default written out
    assert cache_text(sdxl["path"], max_token_length=75, **kw).failed == 3


def test_max_token_length_from_the_dataset_toml(tmp_path: Path, sdxl: dict[str, Any]) -> None:
    _dataset(tmp_path / "imgs")
    cfg = tmp_path / "dataset.toml"
    cfg.write_text(
        '[general]\nmax_token_length = 150\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "imgs"\n'
    )
    args = ["cache", "text", "--model", str(sdxl["path"]), "--arch", "sdxl", "--dataset-config", str(cfg)]
    args += ["--tokenizer", str(sdxl["tok_dir"])]
    res = runner.invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["max_token_length"] == 150
    with np.load(tmp_path / "imgs" / "long_te_outputs.npz") as npz:
        assert npz["hidden_state1"].shape == (152, 64)
    # the option may repeat the TOML's value, not contradict it
    assert runner.invoke(app, [*args, "--max-token-length", "150"]).exit_code == 0
    res = runner.invoke(app, [*args, "--max-token-length", "225"])
    assert res.exit_code == 2 and "dataset.toml [general]: max_token_length 150 contradicts" in res.output


def test_bad_values_are_one_line_errors(tmp_path: Path, sdxl: dict[str, Any]) -> None:
    data = _dataset(tmp_path / "data")
    base = ["cache", "text", "--model", str(sdxl["path"]), "--dataset", str(data)]
    base += ["--tokenizer", str(sdxl["tok_dir"]), "--arch", "sdxl"]
    res = runner.invoke(app, [*base, "--max-token-length", "100"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "error: --max-token-length 100 is not 75, 150 or 225" in res.output and "hint:" in res.output
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f'[[datasets]]\nmax_token_length = 300\n[[datasets.subsets]]\nimage_dir = "{data}"\n')
    with pytest.raises(UsageError, match=r"bad.toml datasets\[0\]: max_token_length 300 is not"):
        cache_text(sdxl["path"], arch="sdxl", dataset_config=cfg, tokenizers=[sdxl["tok_dir"]])
    two = tmp_path / "two.toml"
    two.write_text(
        f'[[datasets]]\nmax_token_length = 150\n[[datasets.subsets]]\nimage_dir = "{data}"\n'
        f'[[datasets]]\nmax_token_length = 225\n[[datasets.subsets]]\nimage_dir = "{data}"\n'
    )
    with pytest.raises(UsageError, match="max_token_length differs between datasets"):
        cache_text(sdxl["path"], arch="sdxl", dataset_config=two, tokenizers=[sdxl["tok_dir"]])
    assert not list(data.glob("*.npz"))


def test_other_families_keep_77_tokens(tmp_path: Path, sdxl: dict[str, Any]) -> None:
    data = _dataset(tmp_path / "data")
    with pytest.raises(UsageError, match="applies to SDXL captions only, not flux"):
        cache_text(None, arch="flux", dataset=data, tokenizers=[sdxl["tok_dir"]], max_token_length=225)
