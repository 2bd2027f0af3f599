"""``cache text`` for Z-Image: a tiny random Qwen3 in ComfyUI's and diffusers' layouts, end to end.

The tokenizer is built here (a WordLevel vocabulary with Qwen's chat specials and a chat template that
renders a user turn the way Qwen3's does), so nothing is downloaded. Expected values are direct calls of
the transformers ``Qwen3Model`` the files were written from, prompted as musubi-tuner and diffusers do.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

import torch
from safetensors import safe_open
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

from lorasmith.cli import app
from lorasmith.io.writer import save_file
from lorasmith.ops.cache._qwen3 import QWEN3_PROMPT, chat_prompt
from lorasmith.ops.cache.text import cache_text

runner = CliRunner()

WORDS = ["a", "photo", "of", "the", "cat", "dog", "red", "blue", "on", "grass", "sitting", "in", "sun"]
WORDS += ["user", "assistant", "second", "line"]
CAPTIONS = {
    "a": "a photo of the red cat",
    # musubi-tuner reads the whole caption file (stripped), newlines included
    "b": "the blue dog sitting on grass\nin the sun",
    "c": "a cat",
}
# a user turn plus the generation prompt, as Qwen3's template renders it (thinking enabled: no <think>)
TEMPLATE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)


def _tokenizer_dir(folder: Path, template: bool) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<unk>": 3}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )
    if template:
        fast.chat_template = TEMPLATE
    fast.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def toks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("qtok")
    with_t = _tokenizer_dir(root / "qwen", template=True)
    without = _tokenizer_dir(root / "plain", template=False)
    return {
        "dir": with_t,
        "plain_dir": without,
        "tok": AutoTokenizer.from_pretrained(str(with_t), local_files_only=True),
    }


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory, toks: dict[str, Any]) -> dict[str, Any]:
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=len(toks["tok"]),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        max_position_embeddings=40960,
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    model = Qwen3Model(config).eval()
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    root = tmp_path_factory.mktemp("qwen")
    # ComfyUI's qwen_3_4b.safetensors: the Qwen3Model under ``model.``
    comfy = root / "qwen_3_4b.safetensors"
    save_file({"model." + k: v for k, v in state.items()}, comfy, hashes=False)
    # a diffusers text_encoder/ folder: shards with bare keys
    names = sorted(state)
    half = len(names) // 2
    shards = [root / "model-00001-of-00002.safetensors", root / "model-00002-of-00002.safetensors"]
    save_file({k: state[k] for k in names[:half]}, shards[0], hashes=False)
    save_file({k: state[k] for k in names[half:]}, shards[1], hashes=False)
    return {"model": model, "comfy": comfy, "shards": shards}


def _dataset(folder: Path, missing: str | None = "d") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, caption in CAPTIONS.items():
        (folder / f"{stem}.png").write_bytes(b"not read by cache text")
        (folder / f"{stem}.txt").write_text(f"  {caption}\n\n")
    if missing:
        (folder / f"{missing}.jpg").write_bytes(b"")
    return folder


def _direct(model: Any, tok: Any, caption: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """musubi-tuner's get_text_embeds for one caption, then trimmed to its tokens."""
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": caption}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=True,
    )
    assert prompt == QWEN3_PROMPT.format(caption)
    out = tok([prompt], padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    ids, mask = out["input_ids"], out["attention_mask"].bool()
    # a copy for another dtype: casting the shared fixture there and back would round its weights
    run = copy.deepcopy(model).to(dtype) if dtype != torch.float32 else model
    with torch.no_grad():
        hidden = run(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
    return hidden[0, : int(mask[0].sum())]


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def test_zimage_end_to_end_names_keys_values_and_resume(
    tmp_path: Path, toks: dict[str, Any], qwen: dict[str, Any]
) -> None:
    data = _dataset(tmp_path / "data")
    args = ["cache", "text", "--arch", "zimage", "--text-encoder", str(qwen["comfy"])]
    args += ["--tokenizer", str(toks["dir"]), "--dataset", str(data), "--batch-size", "2"]
    res = runner.invoke(app, [*args, "--json"])
    assert res.exit_code == 1, res.output
    payload = json.loads(res.stdout)
    assert (payload["written"], payload["skipped"], payload["failed"]) == (3, 0, 1)
    assert payload["cache_format"] == "musubi-tuner safetensors" and set(payload["encoders"]) == {"qwen3"}
    failed = next(it for it in payload["items"] if it["status"] == "failed")
    assert "d.jpg" in failed["error"]
    assert sorted(p.name for p in data.glob("*.safetensors")) == [f"{s}_zi_te.safetensors" for s in "abc"]

    for stem, caption in CAPTIONS.items():
        tensors, meta = _read(data / f"{stem}_zi_te.safetensors")
        assert meta == {"architecture": "z_image", "caption1": caption, "format_version": "1.0.1"}
        assert list(tensors) == ["varlen_llm_embed_float32"]
        embed = tensors["varlen_llm_embed_float32"]
        expected = _direct(qwen["model"], toks["tok"], caption)
        # template tokens (<|im_start|> user ... <|im_end|> <|im_start|> assistant) + the caption's words
        assert embed.dtype == torch.float32 and embed.shape == (len(caption.split()) + 5, 32)
        torch.testing.assert_close(embed, expected, rtol=1e-5, atol=1e-5)
        # right padding with a causal model: the same as encoding the prompt alone
        alone = toks["tok"]([chat_prompt(toks["tok"], caption)], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            unpadded = qwen["model"](input_ids=alone, output_hidden_states=True).hidden_states[-2][0]
        torch.testing.assert_close(embed, unpadded, rtol=1e-4, atol=1e-5)

    # a second run skips everything; deleting one cache re-creates just that one
    res2 = runner.invoke(app, [*args, "-q"])
    assert res2.exit_code == 1 and "3 skipped" in res2.stdout and "Traceback" not in res2.output
    mtime = (data / "a_zi_te.safetensors").stat().st_mtime_ns
    (data / "b_zi_te.safetensors").unlink()
    r3 = cache_text(
        None, arch="zimage", text_encoders=[qwen["comfy"]], dataset=data, tokenizers=[toks["dir"]]
    )
    assert (r3.written, r3.skipped, r3.failed) == (1, 2, 1)
    assert next(it for it in r3.items if it.status == "written").image.endswith("b.png")
    assert (data / "a_zi_te.safetensors").stat().st_mtime_ns == mtime
    assert not list(data.glob(".*.tmp"))

    # an edited caption makes its cache stale: replaced only with --overwrite
    (data / "c.txt").write_text("a red dog")
    kw: dict[str, Any] = {"arch": "zimage", "text_encoders": [qwen["comfy"]], "dataset": data}
    r4 = cache_text(None, tokenizers=[toks["dir"]], **kw)
    stale = next(it for it in r4.items if it.image.endswith("c.png"))
    assert stale.status == "failed" and "--overwrite" in (stale.error or "")
    r5 = cache_text(None, tokenizers=[toks["dir"]], overwrite=True, **kw)
    assert (r5.written, r5.skipped) == (1, 2)
    tensors, meta = _read(data / "c_zi_te.safetensors")
    assert meta["caption1"] == "a red dog"
    torch.testing.assert_close(
        tensors["varlen_llm_embed_float32"],
        _direct(qwen["model"], toks["tok"], "a red dog"),
        rtol=1e-5,
        atol=1e-5,
    )


def test_zimage_bfloat16_shards_and_plain_tokenizer(
    tmp_path: Path, toks: dict[str, Any], qwen: dict[str, Any]
) -> None:
    data = _dataset(tmp_path / "data", missing=None)
    # the diffusers shards, bare keys, with a tokenizer that has no chat template: the same prompt
    r = cache_text(
        None,
        arch="zimage",
        text_encoders=qwen["shards"],
        tokenizers=[toks["plain_dir"]],
        dataset=data,
        dtype="bfloat16",
    )
    assert (r.written, r.failed) == (3, 0)
    for stem, caption in CAPTIONS.items():
        tensors, _ = _read(data / f"{stem}_zi_te.safetensors")
        # musubi-tuner's own dtype: the key names it
        assert list(tensors) == ["varlen_llm_embed_bfloat16"]
        embed = tensors["varlen_llm_embed_bfloat16"]
        assert embed.dtype == torch.bfloat16
        expected = _direct(qwen["model"], toks["tok"], caption, torch.bfloat16)
        torch.testing.assert_close(embed, expected, rtol=0, atol=0)
    # a float32 run accepts the bfloat16 caches (same captions, same token counts)
    again = cache_text(
        None, arch="zimage", text_encoders=[qwen["comfy"]], tokenizers=[toks["dir"]], dataset=data
    )
    assert (again.written, again.skipped) == (0, 3)


def test_zimage_from_a_bundled_checkpoint_and_diffusers_folder(
    tmp_path: Path, toks: dict[str, Any], qwen: dict[str, Any]
) -> None:
    # a checkpoint that carries the text encoder, under any prefix; the tokenizer from a diffusers folder
    bundle = tmp_path / "zimage_aio.safetensors"
    with safe_open(str(qwen["comfy"]), "pt") as f:
        tensors = {"text_encoders.qwen3_4b." + k: f.get_tensor(k) for k in f.keys()}
    tensors["layers.0.attention.qkv.weight"] = torch.zeros(6, 2)
    save_file(tensors, bundle, hashes=False)
    folder = tmp_path / "Z-Image"
    _tokenizer_dir(folder / "tokenizer", template=True)
    data = _dataset(tmp_path / "data", missing=None)
    r = cache_text(bundle, arch="zimage", tokenizers=[folder], dataset=data)
    assert (r.written, r.failed) == (3, 0)
    tensors2, _ = _read(data / "a_zi_te.safetensors")
    torch.testing.assert_close(
        tensors2["varlen_llm_embed_float32"],
        _direct(qwen["model"], toks["tok"], CAPTIONS["a"]),
        rtol=1e-5,
        atol=1e-5,
    )


def test_zimage_errors(tmp_path: Path, toks: dict[str, Any], qwen: dict[str, Any]) -> None:
    data = _dataset(tmp_path / "data", missing=None)
    base = ["cache", "text", "--arch", "zimage", "--dataset", str(data)]
    te = ["--text-encoder", str(qwen["comfy"])]
    res = runner.invoke(app, [*base, *te])
    assert res.exit_code == 2 and "no tokenizer for qwen3" in res.output and "--tokenizer DIR" in res.output
    assert "Traceback" not in res.output
    tok = ["--tokenizer", str(toks["dir"])]
    res = runner.invoke(app, [*base, *tok])
    assert (
        res.exit_code == 2 and "no Qwen3 text encoder given" in res.output and "--text-encoder" in res.output
    )
    clip = tmp_path / "clip_l.safetensors"
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(4, 8)}, clip, hashes=False)
    res = runner.invoke(app, [*base, *tok, "--text-encoder", str(clip)])
    assert res.exit_code == 1 and "no Qwen3 text-encoder tensors" in res.output
    res = runner.invoke(app, [*base, *tok, *te, "--tokenizer2", str(toks["dir"])])
    assert res.exit_code == 2 and "one tokenizer" in res.output
    res = runner.invoke(app, [*base, *tok, *te, "--t5-max-length", "77"])
    assert res.exit_code == 2 and "no T5" in res.output
    res = runner.invoke(app, [*base, "--tokenizer", str(tmp_path / "nope"), *te])
    assert res.exit_code == 1 and "tokenizer folder not found" in res.output
    assert not list(data.glob("*.safetensors"))
