"""``cache text``: tiny real text encoders in each family's layout, end to end on a few captions.

Tokenizers are built here from a handful of words (a CLIP BPE ``vocab.json`` + ``merges.txt``; a T5-like
WordLevel ``tokenizer.json``), so nothing is downloaded. The expected values are direct calls of the
transformers models the checkpoints were written from.
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
from transformers import (
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

from lorasmith.cli import app
from lorasmith.io.writer import save_file
from lorasmith.ops.cache._te_models import openclip_to_hf
from lorasmith.ops.cache.text import cache_text

runner = CliRunner()

WORDS = ["a", "photo", "of", "the", "cat", "dog", "red", "blue", "on", "grass", "sitting", "in", "sun"]
CAPTIONS = {
    "a": "a photo of the red cat",
    "b": "the blue dog sitting on grass in the sun",
    "c": "a cat",
}


# ------------------------------------------------------------------------------------------ tokenizers
def _clip_tokenizer_dir(folder: Path) -> Path:
    """A CLIP BPE tokenizer knowing WORDS: characters, the merges that spell each word, the specials."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for ch in sorted(set("".join(WORDS))):
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[str] = []
    for word in WORDS:
        cur = word[0]
        for i, ch in enumerate(word[1:], 1):
            right = ch + ("</w>" if i == len(word) - 1 else "")
            merge = f"{cur} {right}"
            if merge not in merges:
                merges.append(merge)
            cur += right
            vocab.setdefault(cur, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def _t5_tokenizer_dir(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # T5 appends </s> to every sequence
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def toks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("tok")
    clip_dir = _clip_tokenizer_dir(root / "clip")
    t5_dir = _t5_tokenizer_dir(root / "t5")
    return {
        "clip_dir": clip_dir,
        "t5_dir": t5_dir,
        "clip": CLIPTokenizer.from_pretrained(str(clip_dir), local_files_only=True),
        "t5": AutoTokenizer.from_pretrained(str(t5_dir), local_files_only=True),
    }


# -------------------------------------------------------------------------------------------- encoders
def _clip(tok: Any, width: int, act: str, projection: int | None, seed: int) -> Any:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=width,
        intermediate_size=2 * width,
        projection_dim=projection or width,
        num_hidden_layers=3,
        num_attention_heads=width // 64,
        max_position_embeddings=77,
        hidden_act=act,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return model.eval()


def _t5(tok: Any, seed: int) -> Any:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tok),
        d_model=32,
        d_kv=16,
        d_ff=48,
        num_layers=2,
        num_heads=2,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return T5EncoderModel(config).eval()


def _hf_clip_state(model: Any) -> dict[str, torch.Tensor]:
    """HF CLIP tensors as the files name them (transformers 5 drops ``text_model.`` in CLIPTextModel)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith("position_ids"):
            continue
        key = k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k
        out[key] = v.detach().clone().contiguous()
    return out


def _to_openclip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of the HF conversion, written independently: SDXL's bigG layout."""
    out: dict[str, torch.Tensor] = {}
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj"}
    names |= {"mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    layers = {int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers.")}
    for i in layers:
        pre = f"text_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            qkv = [state[f"{pre}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(qkv)
            for hf, oc in names.items():
                out[f"transformer.resblocks.{i}.{oc}.{kind}"] = state[f"{pre}{hf}.{kind}"]
    out["token_embedding.weight"] = state["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = state["text_model.embeddings.position_embedding.weight"]
    out["ln_final.weight"] = state["text_model.final_layer_norm.weight"]
    out["ln_final.bias"] = state["text_model.final_layer_norm.bias"]
    out["text_projection"] = state["text_projection.weight"].t().contiguous()
    out["logit_scale"] = torch.tensor(4.6)
    return out


def _t5_state(model: Any) -> dict[str, torch.Tensor]:
    # ComfyUI's T5 files keep only ``shared.weight`` of the tied token table
    return {
        k: v.detach().clone().contiguous()
        for k, v in model.state_dict().items()
        if k != "encoder.embed_tokens.weight"
    }


def _prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def _dataset(folder: Path, missing: str | None = "d") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, caption in CAPTIONS.items():
        (folder / f"{stem}.png").write_bytes(b"not read by cache text")
        # .caption wins over .txt; "c" has only a .txt
        (folder / f"{stem}{'.txt' if stem == 'c' else '.caption'}").write_text(caption + "\nsecond line\n")
    if missing:
        (folder / f"{missing}.jpg").write_bytes(b"")
    return folder


def _ids(tok: Any, text: str, length: int, pad: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    out = tok([text], padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    ids, mask = out["input_ids"], out["attention_mask"]
    if pad is not None:
        ids = ids.masked_fill(mask == 0, pad)
    return ids, mask


def _close(a: np.ndarray, b: torch.Tensor) -> None:
    torch.testing.assert_close(torch.from_numpy(a), b.detach().float(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ SDXL
@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory, toks: dict[str, Any]) -> dict[str, Any]:
    clip_l = _clip(toks["clip"], 64, "quick_gelu", None, 0)
    clip_g = _clip(toks["clip"], 128, "gelu", 96, 1)
    tensors = _prefixed("conditioner.embedders.0.transformer.", _hf_clip_state(clip_l))
    tensors |= _prefixed("conditioner.embedders.1.model.", _to_openclip(_hf_clip_state(clip_g)))
    tensors["model.diffusion_model.out.2.weight"] = torch.zeros(4, 8, 3, 3)
    path = tmp_path_factory.mktemp("sdxl") / "sdxl.safetensors"
    save_file(tensors, path, hashes=False)
    return {"path": path, "clip_l": clip_l, "clip_g": clip_g}


def test_openclip_conversion_round_trip(sdxl: dict[str, Any]) -> None:
    state = _hf_clip_state(sdxl["clip_g"])
    back = openclip_to_hf(_to_openclip(state))
    assert set(back) == set(state)
    for k, v in state.items():
        torch.testing.assert_close(back[k], v, rtol=0, atol=0)


def test_sdxl_end_to_end_names_keys_values_and_resume(
    tmp_path: Path, toks: dict[str, Any], sdxl: dict[str, Any]
) -> None:
    data = _dataset(tmp_path / "data")
    args = ["cache", "text", "--model", str(sdxl["path"]), "--arch", "sdxl", "--dataset", str(data)]
    args += ["--tokenizer", str(toks["clip_dir"]), "--batch-size", "2"]
    res = runner.invoke(app, [*args, "--json"])
    assert res.exit_code == 1, res.output
    payload = json.loads(res.stdout)
    assert (payload["written"], payload["skipped"], payload["failed"]) == (3, 0, 1)
    failed = next(it for it in payload["items"] if it["status"] == "failed")
    assert "d.jpg" in failed["error"] and "d.caption or d.txt" in failed["error"]
    assert sorted(p.name for p in data.glob("*.npz")) == [f"{s}_te_outputs.npz" for s in "abc"]

    tok = toks["clip"]
    for stem, caption in CAPTIONS.items():
        with np.load(data / f"{stem}_te_outputs.npz") as npz:
            arrays = {k: npz[k] for k in npz.files}
        assert set(arrays) == {"hidden_state1", "hidden_state2", "pool2"}
        assert arrays["hidden_state1"].shape == (77, 64) and arrays["hidden_state1"].dtype == np.float32
        assert arrays["hidden_state2"].shape == (77, 128) and arrays["hidden_state2"].dtype == np.float32
        assert arrays["pool2"].shape == (96,) and arrays["pool2"].dtype == np.float32
        with torch.no_grad():
            ids1, _ = _ids(tok, caption, 77)
            h1 = sdxl["clip_l"](ids1, output_hidden_states=True).hidden_states[-2][0]
            ids2, _ = _ids(tok, caption, 77, pad=0)  # sd-scripts pads CLIP-G with id 0
            out2 = sdxl["clip_g"](ids2, output_hidden_states=True)
        _close(arrays["hidden_state1"], h1)
        _close(arrays["hidden_state2"], out2.hidden_states[-2][0])
        _close(arrays["pool2"], out2.text_embeds[0])

    # a second run skips everything; deleting one cache re-creates just that one
    res2 = runner.invoke(app, [*args, "-q"])
    assert res2.exit_code == 1 and "3 skipped" in res2.stdout and "Traceback" not in res2.output
    (data / "b_te_outputs.npz").unlink()
    r3 = cache_text(sdxl["path"], arch="sdxl", dataset=data, tokenizers=[toks["clip_dir"]])
    assert (r3.written, r3.skipped, r3.failed) == (1, 2, 1)
    assert next(it for it in r3.items if it.status == "written").image.endswith("b.png")


def test_stale_cache_needs_overwrite(tmp_path: Path, toks: dict[str, Any], sdxl: dict[str, Any]) -> None:
    data = _dataset(tmp_path / "data", missing=None)
    (data / "a_te_outputs.npz").write_bytes(b"broken")
    kw: dict[str, Any] = {"arch": "sdxl", "dataset": data, "tokenizers": [toks["clip_dir"]]}
    r = cache_text(sdxl["path"], **kw)
    assert (r.written, r.failed) == (2, 1) and "--overwrite" in (r.items[0].error or "")
    assert (data / "a_te_outputs.npz").read_bytes() == b"broken"
    r2 = cache_text(sdxl["path"], overwrite=True, **kw)
    assert (r2.written, r2.skipped) == (1, 2)


# ------------------------------------------------------------------------------------------------ FLUX
def test_flux_from_separate_files(tmp_path: Path, toks: dict[str, Any]) -> None:
    clip_l = _clip(toks["clip"], 64, "quick_gelu", None, 2)
    t5 = _t5(toks["t5"], 3)
    l_file, t5_file = tmp_path / "clip_l.safetensors", tmp_path / "t5xxl.safetensors"
    state = _hf_clip_state(clip_l)
    state["text_projection.weight"] = torch.eye(64)  # ComfyUI's clip_l carries one; FLUX does not use it
    save_file(state, l_file, hashes=False)
    save_file(_t5_state(t5), t5_file, hashes=False)
    data = _dataset(tmp_path / "data", missing=None)
    args = ["cache", "text", "--arch", "flux", "--text-encoder", str(t5_file), "--text-encoder", str(l_file)]
    args += [
        "--tokenizer",
        str(toks["clip_dir"]),
        "--tokenizer2",
        str(toks["t5_dir"]),
        "--dataset",
        str(data),
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "3 written" in res.stdout and "512 tokens" in res.stdout
    for stem, caption in CAPTIONS.items():
        with np.load(data / f"{stem}_flux_te.npz") as npz:
            arrays = {k: npz[k] for k in npz.files}
        assert set(arrays) == {"l_pooled", "t5_out", "txt_ids", "t5_attn_mask", "apply_t5_attn_mask"}
        assert arrays["l_pooled"].shape == (64,) and arrays["l_pooled"].dtype == np.float32
        assert arrays["t5_out"].shape == (512, 32) and arrays["t5_out"].dtype == np.float32
        assert arrays["txt_ids"].shape == (512, 3) and arrays["txt_ids"].dtype == np.float32
        assert not arrays["txt_ids"].any()
        assert arrays["t5_attn_mask"].shape == (512,) and arrays["t5_attn_mask"].dtype == np.int64
        assert arrays["apply_t5_attn_mask"].shape == () and arrays["apply_t5_attn_mask"].dtype == np.bool_
        assert not arrays["apply_t5_attn_mask"]
        ids_l, _ = _ids(toks["clip"], caption, 77)
        ids_t, mask_t = _ids(toks["t5"], caption, 512)
        with torch.no_grad():
            _close(arrays["l_pooled"], clip_l(ids_l).pooler_output[0])
            _close(arrays["t5_out"], t5(ids_t).last_hidden_state[0])
        assert np.array_equal(arrays["t5_attn_mask"], mask_t[0].numpy())
        assert int(mask_t.sum()) == len(caption.split()) + 1  # words + </s>

    # another mask flag makes the caches stale: replaced only with --overwrite, then masked outputs
    masked = [*args, "--apply-t5-attn-mask"]
    assert runner.invoke(app, masked).exit_code == 1
    res2 = runner.invoke(app, [*masked, "--overwrite", "--t5-max-length", "512"])
    assert res2.exit_code == 0, res2.output
    with np.load(data / "a_flux_te.npz") as npz:
        assert bool(npz["apply_t5_attn_mask"])
        ids_t, mask_t = _ids(toks["t5"], CAPTIONS["a"], 512)
        with torch.no_grad():
            _close(npz["t5_out"], t5(ids_t, attention_mask=mask_t).last_hidden_state[0])


# ------------------------------------------------------------------------------------------------- SD3
def test_sd3_bundled_encoders(tmp_path: Path, toks: dict[str, Any]) -> None:
    clip_l = _clip(toks["clip"], 64, "quick_gelu", 64, 4)
    clip_g = _clip(toks["clip"], 128, "gelu", 128, 5)
    t5 = _t5(toks["t5"], 6)
    tensors = _prefixed("text_encoders.clip_l.transformer.", _hf_clip_state(clip_l))
    tensors |= _prefixed("text_encoders.clip_g.transformer.", _hf_clip_state(clip_g))
    tensors |= _prefixed("text_encoders.t5xxl.transformer.", _t5_state(t5))
    tensors["text_encoders.clip_l.logit_scale"] = torch.tensor(4.6)
    tensors["model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias"] = torch.zeros(8)
    ckpt = tmp_path / "sd3.safetensors"
    save_file(tensors, ckpt, hashes=False)
    data = _dataset(tmp_path / "data", missing=None)
    r = cache_text(
        ckpt,
        arch="sd3",
        dataset=data,
        tokenizers=[toks["clip_dir"], None, toks["t5_dir"]],
        apply_lg_attn_mask=True,
        batch_size=3,
    )
    assert (r.written, r.failed, r.t5_max_length) == (3, 0, 256)
    assert set(r.encoders) == {"clip_l", "clip_g", "t5xxl"}
    for stem, caption in CAPTIONS.items():
        with np.load(data / f"{stem}_sd3_te.npz") as npz:
            arrays = {k: npz[k] for k in npz.files}
        assert set(arrays) == {
            "lg_out",
            "lg_pooled",
            "t5_out",
            "clip_l_attn_mask",
            "clip_g_attn_mask",
            "t5_attn_mask",
            "apply_lg_attn_mask",
            "apply_t5_attn_mask",
        }
        assert arrays["lg_out"].shape == (77, 192) and arrays["lg_out"].dtype == np.float32
        assert arrays["lg_pooled"].shape == (192,) and arrays["t5_out"].shape == (256, 32)
        assert arrays["clip_l_attn_mask"].shape == (77,) and arrays["t5_attn_mask"].shape == (256,)
        assert bool(arrays["apply_lg_attn_mask"]) and not bool(arrays["apply_t5_attn_mask"])
        ids_l, mask_l = _ids(toks["clip"], caption, 77)
        ids_g, mask_g = _ids(toks["clip"], caption, 77, pad=0)
        ids_t, _ = _ids(toks["t5"], caption, 256)
        with torch.no_grad():
            ol = clip_l(ids_l, attention_mask=mask_l, output_hidden_states=True)
            og = clip_g(ids_g, attention_mask=mask_g, output_hidden_states=True)
            _close(arrays["lg_out"], torch.cat([ol.hidden_states[-2], og.hidden_states[-2]], -1)[0])
            _close(arrays["lg_pooled"], torch.cat([ol.text_embeds, og.text_embeds], -1)[0])
            _close(arrays["t5_out"], t5(ids_t).last_hidden_state[0])
        assert np.array_equal(arrays["clip_g_attn_mask"], mask_g[0].numpy())
    again = cache_text(
        ckpt,
        arch="sd3",
        dataset=data,
        tokenizers=[toks["clip_dir"], None, toks["t5_dir"]],
        apply_lg_attn_mask=True,
    )
    assert (again.written, again.skipped) == (0, 3)


# ---------------------------------------------------------------------------------------------- errors
def test_missing_tokenizer_says_what_to_pass(
    tmp_path: Path, toks: dict[str, Any], sdxl: dict[str, Any]
) -> None:
    data = _dataset(tmp_path / "data", missing=None)
    base = ["cache", "text", "--dataset", str(data)]
    res = runner.invoke(app, [*base, "--model", str(sdxl["path"]), "--arch", "sdxl"])
    assert res.exit_code == 2 and "--tokenizer DIR" in res.output and "Traceback" not in res.output
    res = runner.invoke(
        app, [*base, "--model", str(sdxl["path"]), "--arch", "sdxl", "--tokenizer", str(tmp_path / "nope")]
    )
    assert res.exit_code == 1 and "tokenizer folder not found" in res.output
    res = runner.invoke(
        app, [*base, "--model", str(sdxl["path"]), "--arch", "sdxl", "--tokenizer", str(data)]
    )
    assert res.exit_code == 1 and "cannot load the clip_l tokenizer" in res.output
    assert "Traceback" not in res.output
    assert not list(data.glob("*.npz"))


def test_missing_encoder_and_unsupported_families(tmp_path: Path, toks: dict[str, Any]) -> None:
    data = _dataset(tmp_path / "data", missing=None)
    base = ["cache", "text", "--dataset", str(data), "--tokenizer", str(toks["clip_dir"])]
    res = runner.invoke(app, [*base, "--arch", "flux"])
    assert res.exit_code == 2 and "no clip_l given" in res.output and "--text-encoder" in res.output
    res = runner.invoke(app, [*base, "--arch", "zimage"])
    assert res.exit_code == 2 and "no Qwen3 text encoder given" in res.output
    res = runner.invoke(app, [*base, "--arch", "sd1"])
    assert res.exit_code == 2 and "no text-encoder cache format" in res.output
    res = runner.invoke(app, ["cache", "text", "--dataset", str(data)])
    assert res.exit_code == 2 and "--model" in res.output and "Traceback" not in res.output
