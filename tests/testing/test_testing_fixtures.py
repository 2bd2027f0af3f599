"""The fixture factory of lorasmith.testing, on the toy family and on a tiny inline family."""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from lorasmith.archs.base import Alias, Architecture, Inventory, Target, TensorSpec
from lorasmith.testing import (
    ToyArch,
    lokr_factorization,
    make_checkpoint,
    make_lora,
    make_tuned,
    resolve_inventory,
    shrink_shape,
    shrink_slice,
    write_bad_files,
)
from lorasmith.testing.fixtures import _safetensors_bytes
from lorasmith.testing.toy import HIDDEN, TE_PREFIX, UNET_PREFIX

QKV = UNET_PREFIX + "blocks.0.attn.qkv.weight"
CONV = UNET_PREFIX + "blocks.0.conv.weight"
PROJ_IN = UNET_PREFIX + "blocks.0.proj_in.weight"


@pytest.fixture(scope="module")
def toy() -> ToyArch:
    return ToyArch()


class Tiny(Architecture):
    """A family declared inline: one variant, four tensors, one kohya alias per weight."""

    id = "tiny"
    name = "Tiny"
    variants = ("v1",)
    spellings = ("kohya",)

    @cached_property
    def _inv(self) -> tuple[Inventory, ...]:
        tensors = {
            "net.lin.weight": TensorSpec((128, 192), "F16"),
            "net.lin.bias": TensorSpec((128,), "F16"),
            "net.conv.weight": TensorSpec((64, 128, 3, 3), "F16"),
            "net.scale": TensorSpec((), "F32"),
        }
        return (Inventory("tiny-v1", "tiny", "v1", "plain", True, {"net": "net."}, frozenset(), tensors),)

    def inventories(self) -> tuple[Inventory, ...]:
        return self._inv

    def _build_aliases(self, variant: str) -> Iterable[Alias]:
        yield Alias("lora_net_lin", "kohya", Target("net.lin.weight"), "net")
        yield Alias("lora_net_conv", "kohya", Target("net.conv.weight"), "net")


# ------------------------------------------------------------------------------------------- shrinking
def test_shrink_shape_divides_only_multiples() -> None:
    assert shrink_shape((1280, 2560, 3, 3)) == (20, 40, 3, 3)
    assert shrink_shape((77, 768)) == (77, 12)
    assert shrink_shape(()) == ()
    assert shrink_shape((0, 64)) == (0, 1)
    assert shrink_shape((1280, 3), factor=1) == (1280, 3)


def test_shrink_slice_keeps_fused_weights_consistent() -> None:
    rows = 21504  # FLUX single_blocks.N.linear1: q, k, v, mlp
    parts = [(0, 0, 3072), (0, 3072, 3072), (0, 6144, 3072), (0, 9216, 12288)]
    shrunk = [shrink_slice(p, dim_size=rows) for p in parts]
    assert shrunk == [(0, 0, 48), (0, 48, 48), (0, 96, 48), (0, 144, 192)]
    assert sum(s[2] for s in shrunk) == shrink_shape((rows,))[0]
    assert shrink_slice((0, 10, 7), dim_size=77) == (0, 10, 7)  # dimension kept, slice kept
    with pytest.raises(ValueError, match="multiples"):
        shrink_slice((0, 32, 64), dim_size=128)


# ------------------------------------------------------------------------------------------ checkpoints
def test_make_checkpoint_writes_every_key_shrunk(tmp_path: Path, toy: ToyArch) -> None:
    path = tmp_path / "base.safetensors"
    tensors = make_checkpoint(toy, path)
    inv = toy.canonical_inventory()
    assert list(tensors) == list(inv.tensors)
    on_disk = load_file(path)
    assert set(on_disk) == set(inv.tensors)
    for key, spec in inv.tensors.items():
        assert tuple(on_disk[key].shape) == shrink_shape(spec.shape), key
        assert torch.equal(on_disk[key], tensors[key])
    assert on_disk[QKV].shape == (12, 4)
    assert on_disk[QKV].dtype == torch.float32  # default dtype, inventory says F16
    ids = on_disk[TE_PREFIX + "embeddings.position_ids"]
    assert ids.dtype == torch.int64
    assert torch.equal(ids[0], torch.arange(77))
    assert on_disk[TE_PREFIX + "logit_scale"].shape == ()
    std = torch.cat([t.flatten() for t in on_disk.values() if t.dtype.is_floating_point]).std().item()
    assert 0.015 < std < 0.025


def test_make_checkpoint_is_deterministic_and_seeded(tmp_path: Path, toy: ToyArch) -> None:
    make_checkpoint(toy, tmp_path / "a.safetensors", seed=3)
    make_checkpoint(toy, tmp_path / "b.safetensors", seed=3)
    make_checkpoint(toy, tmp_path / "c.safetensors", seed=4)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    a, c = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "c.safetensors")
    assert not torch.equal(a[QKV], c[QKV])


def test_make_checkpoint_subsets_keep_values(tmp_path: Path, toy: ToyArch) -> None:
    full = make_checkpoint(toy, tmp_path / "full.safetensors")
    unet = make_checkpoint(
        toy, tmp_path / "unet.safetensors", components=("unet",), key_prefix_strip=UNET_PREFIX
    )
    assert set(unet) == {k[len(UNET_PREFIX) :] for k in full if k.startswith(UNET_PREFIX)}
    assert torch.equal(unet["blocks.0.attn.qkv.weight"], full[QKV])
    with pytest.raises(ValueError, match="no component"):
        make_checkpoint(toy, tmp_path / "x.safetensors", components=("vae",))


def test_make_checkpoint_layouts_dtypes_and_planting(tmp_path: Path, toy: ToyArch) -> None:
    diff = make_checkpoint(toy, tmp_path / "d.safetensors", layout="diffusers")
    assert set(diff) == set(resolve_inventory(toy, layout="toy-small-diffusers").tensors)
    large = make_checkpoint(toy, tmp_path / "l.safetensors", variant="large", dtype=None)
    assert UNET_PREFIX + "blocks.2.conv.weight" in large
    assert large[QKV].dtype == torch.float16
    assert large[TE_PREFIX + "logit_scale"].dtype == torch.float32
    planted = torch.arange(48, dtype=torch.float32).reshape(12, 4)
    got = make_checkpoint(
        toy,
        tmp_path / "p.safetensors",
        planted={QKV: planted, "extra.key": torch.ones(2)},
        metadata={"a": "b"},
    )
    assert torch.equal(got[QKV], planted)
    assert "extra.key" in got
    with safe_open(tmp_path / "p.safetensors", "pt") as fh:
        assert fh.metadata() == {"a": "b"}
        assert torch.equal(fh.get_tensor(QKV), planted)
    with pytest.raises(ValueError, match="no inventory"):
        make_checkpoint(toy, tmp_path / "x.safetensors", layout="nope")


def test_make_checkpoint_inline_family(tmp_path: Path) -> None:
    tensors = make_checkpoint(Tiny(), tmp_path / "t.safetensors", factor=32)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "net.lin.weight": (4, 6),
        "net.lin.bias": (4,),
        "net.conv.weight": (2, 4, 3, 3),
        "net.scale": (),
    }


# ----------------------------------------------------------------------------------------------- tuned
def test_make_tuned_plants_exact_low_rank_deltas(tmp_path: Path, toy: ToyArch) -> None:
    base = make_checkpoint(toy, tmp_path / "base.safetensors", factor=16)
    mods = [QKV, CONV, UNET_PREFIX + "blocks.1.mlp.fc1.weight"]
    deltas = make_tuned(toy, base, tmp_path / "tuned.safetensors", modules=mods, rank=3, seed=1)
    tuned = load_file(tmp_path / "tuned.safetensors")
    assert set(tuned) == set(base)
    for key, t in tuned.items():
        if key not in mods:
            assert torch.equal(t, base[key]), key
    for key in mods:
        d = deltas[key]
        assert d.dtype == torch.float64
        assert d.shape == base[key].shape
        assert torch.linalg.matrix_rank(d.reshape(d.shape[0], -1)).item() == 3
        seen = tuned[key].double() - base[key].double()
        assert torch.allclose(seen, d, atol=1e-7), key
    again = make_tuned(toy, base, tmp_path / "t2.safetensors", modules=mods, rank=3, seed=1)
    assert all(torch.equal(again[k], deltas[k]) for k in mods)


def test_make_tuned_noise_and_errors(tmp_path: Path, toy: ToyArch) -> None:
    base = make_checkpoint(toy, tmp_path / "base.safetensors", factor=16)
    deltas = make_tuned(toy, base, tmp_path / "n.safetensors", modules=[QKV], rank=2, noise=1e-3)
    assert torch.linalg.matrix_rank(deltas[QKV]).item() == min(deltas[QKV].shape)
    with pytest.raises(ValueError, match="no tensor"):
        make_tuned(toy, base, tmp_path / "x.safetensors", modules=["nope"], rank=2)
    with pytest.raises(ValueError, match="2-D or 4-D"):
        make_tuned(toy, base, tmp_path / "x.safetensors", modules=[TE_PREFIX + "logit_scale"], rank=2)


# ------------------------------------------------------------------------------------------------ LoRAs
def _reference_delta(
    t: dict[str, torch.Tensor], name: str, algo: str, shape: tuple[int, ...]
) -> torch.Tensor:
    """The delta computed the plain way from the file's tensors, by applying the module to inputs.

    A linear or conv layer is determined by its action on a basis: feed the identity (linears) or unit
    impulses (convs) through the module's own layers and read the weight back.
    """
    d = {k[len(name) :]: v.double() for k, v in t.items() if k.startswith(name + ".")}
    alpha = d.get(".alpha")
    if algo == "full":
        return d[".diff"]
    if algo in ("lora", "dora", "locon-tucker"):
        down = d.get(".lora_down.weight", d.get(".lora_A.weight"))
        up = d.get(".lora_up.weight", d.get(".lora_B.weight"))
        assert down is not None
        assert up is not None
        rank = down.shape[0]
        g = 1.0 if alpha is None else alpha.item() / rank
        if len(shape) == 2:
            eye = torch.eye(shape[1], dtype=torch.float64)
            return g * F.linear(F.linear(eye, down), up).T
        # conv: probe with unit impulses; each output pixel of a k x k kernel at the centre
        _out_c, in_c, kh, kw = shape
        probe = torch.zeros(in_c, in_c, kh, kw, dtype=torch.float64)
        for c in range(in_c):
            probe[c, c, kh - 1 - kh // 2, kw - 1 - kw // 2] = 1.0
        x = probe
        x = F.conv2d(x, down, padding=(kh // 2, kw // 2) if down.shape[-1] > 1 else 0)
        if ".lora_mid.weight" in d:
            x = F.conv2d(x, d[".lora_mid.weight"], padding=(kh // 2, kw // 2))
        x = F.conv2d(x, up)
        # x[c_in, out, i, j]: response at (i, j) to an impulse -> flipped kernel (cross-correlation)
        return g * x.permute(1, 0, 2, 3).flip(-1, -2)
    if algo == "loha":
        rank = d[".hada_w1_b"].shape[0]
        g = alpha.item() / rank if alpha is not None else 1.0
        w = (d[".hada_w1_a"] @ d[".hada_w1_b"]) * (d[".hada_w2_a"] @ d[".hada_w2_b"])
        return g * w.reshape(shape)
    if algo == "lokr":
        w1, w2a, w2b = d[".lokr_w1"], d[".lokr_w2_a"], d[".lokr_w2_b"]
        rank = w2b.shape[0]
        g = alpha.item() / rank if alpha is not None else 1.0
        n_out, n_in = w2a.shape[0], shape[1] // w1.shape[1]
        w2 = (w2a @ w2b).reshape(n_out, n_in, *shape[2:])
        out = torch.zeros(shape, dtype=torch.float64)
        for i in range(w1.shape[0]):  # block (i, j) of a Kronecker product is w1[i, j] * w2
            for j in range(w1.shape[1]):
                out[i * n_out : (i + 1) * n_out, j * n_in : (j + 1) * n_in] = g * w1[i, j] * w2
        return out
    raise AssertionError(algo)


@pytest.mark.parametrize("algo", ["lora", "locon-tucker", "loha", "lokr", "full", "dora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_make_lora_deltas_match_the_file(tmp_path: Path, toy: ToyArch, algo: str, dtype: torch.dtype) -> None:
    names = [
        "lora_unet_blocks_0_attn_qkv",
        "lora_unet_blocks_1_mlp_fc2",
        "lora_unet_blocks_0_proj_in",
        "lora_unet_blocks_1_conv",
        "lora_unet_conv_in",
        "lora_te_layers_1_self_attn_k_proj",
    ]
    fx = make_lora(toy, tmp_path / "l.safetensors", algo=algo, modules=names, rank=3, dtype=dtype, factor=16)  # type: ignore[arg-type]
    on_disk = load_file(fx.path)
    assert set(on_disk) == set(fx.tensors)
    assert list(fx.modules) == names
    for name, m in fx.modules.items():
        assert m.delta.dtype == torch.float64
        shape = m.target_shape
        assert tuple(m.delta.shape) == shape
        mod_algo = m.algo
        if algo == "locon-tucker":
            assert mod_algo == ("locon-tucker" if len(shape) == 4 and shape[2] > 1 else "lora")
        ref = _reference_delta(on_disk, name, mod_algo, shape)
        assert torch.allclose(ref, m.delta, rtol=1e-9, atol=1e-12), name
        for suffix, factor_t in m.factors.items():
            assert torch.equal(factor_t, on_disk[name + suffix].double())
    if algo != "full":
        assert fx.alpha == 1.5
        assert all(m.alpha == 1.5 and m.scale == 0.5 for m in fx.modules.values())


def test_make_lora_suffixes_per_algo(tmp_path: Path, toy: ToyArch) -> None:
    lin, conv = "lora_unet_blocks_0_attn_proj", "lora_unet_blocks_0_conv"

    def keys(algo: str) -> dict[str, set[str]]:
        fx = make_lora(toy, tmp_path / f"{algo}.safetensors", algo=algo, modules=[lin, conv], rank=2)  # type: ignore[arg-type]
        return {n: {k[len(n) :] for k in fx.tensors if k.startswith(n + ".")} for n in (lin, conv)}

    lora = keys("lora")
    assert lora[lin] == {".lora_down.weight", ".lora_up.weight", ".alpha"}
    tucker = keys("locon-tucker")
    assert tucker[lin] == lora[lin]
    assert tucker[conv] == lora[conv] | {".lora_mid.weight"}
    assert keys("loha")[lin] == {".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".alpha"}
    assert keys("lokr")[conv] == {".lokr_w1", ".lokr_w2_a", ".lokr_w2_b", ".alpha"}
    assert keys("full")[lin] == {".diff"}
    assert keys("dora")[lin] == lora[lin] | {".dora_scale"}


def test_make_lora_shapes(tmp_path: Path, toy: ToyArch) -> None:
    fx = make_lora(
        toy,
        tmp_path / "l.safetensors",
        modules=["lora_unet_blocks_0_conv", "lora_unet_blocks_0_attn_qkv"],
        rank=2,
    )
    t = fx.tensors
    assert t["lora_unet_blocks_0_conv.lora_down.weight"].shape == (2, 2, 3, 3)
    assert t["lora_unet_blocks_0_conv.lora_up.weight"].shape == (2, 2, 1, 1)
    assert t["lora_unet_blocks_0_attn_qkv.lora_down.weight"].shape == (2, 4)
    assert t["lora_unet_blocks_0_attn_qkv.lora_up.weight"].shape == (12, 2)
    assert t["lora_unet_blocks_0_attn_qkv.alpha"].shape == ()
    tucker = make_lora(toy, tmp_path / "t.safetensors", algo="locon-tucker", rank=2)
    assert set(tucker.modules) == {
        "lora_unet_blocks_0_conv",
        "lora_unet_blocks_1_conv",
        "lora_unet_conv_in",
        "lora_unet_out",
    }
    assert tucker.tensors["lora_unet_out.lora_mid.weight"].shape == (2, 2, 3, 3)
    assert tucker.tensors["lora_unet_out.lora_down.weight"].shape == (2, 2, 1, 1)
    assert tucker.tensors["lora_unet_out.lora_up.weight"].shape == (4, 2, 1, 1)
    dora = make_lora(toy, tmp_path / "d.safetensors", algo="dora", modules=["lora_unet_blocks_0_conv"])
    assert dora.tensors["lora_unet_blocks_0_conv.dora_scale"].shape == (2, 1, 1, 1)


def test_lokr_factorization() -> None:
    assert lokr_factorization(48) == (6, 8)
    assert lokr_factorization(12) == (3, 4)
    assert lokr_factorization(5) == (1, 5)
    assert lokr_factorization(16) == (4, 4)
    with pytest.raises(ValueError):
        lokr_factorization(0)


def test_make_lora_peft_slices_and_dense_deltas(tmp_path: Path, toy: ToyArch) -> None:
    fx = make_lora(toy, tmp_path / "p.safetensors", spelling="peft", rank=2)
    assert fx.spelling == "peft"
    assert fx.alpha is None
    assert not any(k.endswith(".alpha") for k in fx.tensors)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in fx.tensors)
    q = fx.modules["transformer.transformer_blocks.0.attn.to_q"]
    k = fx.modules["transformer.transformer_blocks.0.attn.to_k"]
    v = fx.modules["transformer.transformer_blocks.0.attn.to_v"]
    h = HIDDEN // 64
    assert [q.target.slice, k.target.slice, v.target.slice] == [(0, 0, h), (0, h, h), (0, 2 * h, h)]
    assert q.alias.target.slice == (0, 0, HIDDEN)
    assert q.scale == 1.0
    assert fx.tensors["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"].shape == (h, 2)
    dense = fx.dense_deltas()[QKV]
    assert dense.shape == (3 * h, h)
    assert torch.equal(dense, torch.cat([q.delta, k.delta, v.delta]))
    assert fx.deltas[(QKV, (0, h, h))] is k.delta


def test_expected_weights_plain_and_dora(tmp_path: Path, toy: ToyArch) -> None:
    base = make_checkpoint(toy, tmp_path / "base.safetensors")
    fx = make_lora(
        toy, tmp_path / "p.safetensors", spelling="peft", modules=lambda a: "blocks.0.attn" in a.name
    )
    merged = fx.expected_weights(base)
    assert set(merged) == {QKV, UNET_PREFIX + "blocks.0.attn.proj.weight"}
    assert torch.allclose(merged[QKV], base[QKV].double() + fx.dense_deltas()[QKV])
    dora = make_lora(toy, tmp_path / "d.safetensors", algo="dora", modules=["lora_unet_blocks_0_attn_qkv"])
    m = dora.modules["lora_unet_blocks_0_attn_qkv"]
    w = m.expected_weight(base[QKV])
    scale = dora.tensors["lora_unet_blocks_0_attn_qkv.dora_scale"].double()
    assert torch.allclose(w.norm(dim=1, keepdim=True), scale)
    direction = base[QKV].double() + m.delta
    assert torch.allclose(w / w.norm(dim=1, keepdim=True), direction / direction.norm(dim=1, keepdim=True))
    with pytest.raises(ValueError, match="shape"):
        m.expected_weight(torch.zeros(3, 3))


def test_make_lora_selection(tmp_path: Path, toy: ToyArch) -> None:
    every = make_lora(toy, tmp_path / "a.safetensors")
    assert every.spelling == "kohya"
    # default: linears and 1x1 convs, not 3x3 convs
    assert "lora_unet_blocks_0_proj_in" in every.modules
    assert "lora_unet_blocks_0_conv" not in every.modules
    assert len(every.modules) == 2 * 5 + 2 * 6
    few = make_lora(toy, tmp_path / "b.safetensors", limit=4)
    order = list(every.modules)
    assert list(few.modules) == [order[0], order[7], order[14], order[21]]
    # the same module has the same factors whatever else is selected
    name = order[7]
    assert torch.equal(few.modules[name].delta, every.modules[name].delta)
    large = make_lora(
        toy, tmp_path / "c.safetensors", variant="large", modules=lambda a: a.component == "unet"
    )
    assert "lora_unet_blocks_2_mlp_fc1" in large.modules
    assert large.variant == "large"
    named = make_lora(toy, tmp_path / "d.safetensors", modules=["text_encoder.layers.0.mlp.fc1"])
    assert named.spelling == "peft"
    custom = make_lora(toy, tmp_path / "e.safetensors", alpha=8, rank=4, metadata={"ss_network_dim": "4"})
    assert custom.alpha == 8.0
    assert next(iter(custom.modules.values())).scale == 2.0
    with safe_open(custom.path, "pt") as fh:
        assert fh.metadata() == {"ss_network_dim": "4"}
    seeded = make_lora(toy, tmp_path / "f.safetensors", seed=1)
    assert not torch.equal(seeded.modules[name].delta, every.modules[name].delta)


def test_make_lora_errors(tmp_path: Path, toy: ToyArch) -> None:
    p = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="unknown algo"):
        make_lora(toy, p, algo="oft")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="PEFT"):
        make_lora(toy, p, spelling="peft", algo="loha")
    with pytest.raises(ValueError, match="no spelling"):
        make_lora(toy, p, spelling="musubi")
    with pytest.raises(ValueError, match="unknown LoRA module"):
        make_lora(toy, p, modules=["lora_unet_nope"])
    with pytest.raises(ValueError, match="mix spellings"):
        make_lora(toy, p, modules=["lora_unet_conv_in", "text_encoder.layers.0.mlp.fc1"])
    with pytest.raises(ValueError, match="not 'kohya'"):
        make_lora(toy, p, spelling="kohya", modules=["text_encoder.layers.0.mlp.fc1"])
    with pytest.raises(ValueError, match="no lora module"):
        make_lora(toy, p, modules=lambda a: False)
    with pytest.raises(ValueError, match="rank"):
        make_lora(toy, p, rank=0)


def test_make_lora_inline_family(tmp_path: Path) -> None:
    fx = make_lora(
        Tiny(), tmp_path / "t.safetensors", algo="lokr", modules=["lora_net_lin", "lora_net_conv"], rank=1
    )
    lin = fx.modules["lora_net_lin"]
    assert lin.target_shape == (2, 3)
    assert lin.delta.shape == (2, 3)
    assert fx.tensors["lora_net_lin.lokr_w1"].shape == (1, 1)  # 2 = 1 x 2, 3 = 1 x 3
    conv = fx.modules["lora_net_conv"]
    assert fx.tensors["lora_net_conv.lokr_w1"].shape == (1, 1)
    assert fx.tensors["lora_net_conv.lokr_w2_b"].shape == (1, 2 * 9)
    assert conv.delta.shape == (1, 2, 3, 3)
    assert math.isclose(conv.scale, 0.5)


# -------------------------------------------------------------------------------------------- bad files
def _read_all(path: Path) -> None:
    with safe_open(path, "pt") as fh:
        for key in fh.keys():
            fh.get_tensor(key)


def test_write_bad_files_are_all_rejected(tmp_path: Path) -> None:
    bad = write_bad_files(tmp_path / "bad")
    expected = {
        "empty", "short", "truncated", "header_past_end", "corrupt_json", "not_utf8", "json_list",
        "overlapping_offsets", "unknown_dtype", "nonstring_metadata", "byte_count_mismatch", "pickle",
        "pickle_renamed", "random_bytes", "directory",
    }  # fmt: skip
    assert set(bad) == expected
    for name, path in bad.items():
        assert path.exists(), name
        with pytest.raises(Exception):  # the error type differs per defect
            _read_all(path)
    assert bad["directory"].is_dir()
    assert bad["pickle"].read_bytes()[:2] == b"PK"
    assert bad["pickle"].suffix == ".ckpt"
    assert bad["empty"].stat().st_size == 0
    # control: the same byte builder with nothing wrong gives a file safetensors reads
    good = tmp_path / "good.safetensors"
    header = {"__metadata__": {"k": "v"}, "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    good.write_bytes(_safetensors_bytes(header, b"\x00" * 16))
    assert load_file(good)["w"].shape == (2, 2)
    # idempotent: a second call into the same folder works
    assert write_bad_files(tmp_path / "bad").keys() == bad.keys()
