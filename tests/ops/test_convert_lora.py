"""convert (LoRAs): every family's spellings both ways, deltas unchanged, round trips, fuse/split, lossy."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lorasmith.archs.base import Alias, Architecture, Target
from lorasmith.cli import app
from lorasmith.errors import LorasmithError, UsageError
from lorasmith.io.header import read_header
from lorasmith.io.reader import load_all
from lorasmith.ops.convert import convert
from lorasmith.ops.loralib import load_lora
from lorasmith.registry import get
from lorasmith.testing import make_lora
from lorasmith.testing.fixtures import LoraFixture

FAMILIES = [
    ("sd1", "sd1"),
    ("sd1", "sd2"),
    ("sdxl", "base"),
    ("flux", "dev"),
    ("sd3", "sd3-medium"),
    ("zimage", None),
]


def file_deltas(path: Path, arch: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Canonical key -> summed dense delta of every module of the LoRA at ``path`` (float64)."""
    out: dict[str, torch.Tensor] = {}
    with load_lora(path, arch=arch) as lora:
        for name, info in lora.modules.items():
            assert info.alias is not None, name
            tgt = info.alias.target
            d = lora.read_module(name).module.delta(dtype=torch.float64)
            acc = out.setdefault(tgt.key, torch.zeros(shapes[tgt.key], dtype=torch.float64))
            if tgt.slice is None:
                acc += d.reshape(acc.shape)
            else:
                dim, start, length = tgt.slice
                rows = d.shape[0]
                assert length % rows == 0
                ratio = length // rows
                acc.narrow(dim, start // ratio, rows).add_(d.reshape(rows, *acc.shape[1:]))
    return out


def assert_same_deltas(fx: LoraFixture, path: Path, tol: float = 1e-6) -> None:
    shapes = {m.target.key: m.target_shape for m in fx.modules.values()}
    got = file_deltas(path, fx.arch, shapes)
    want = fx.dense_deltas()
    assert set(got) == set(want)
    for key, w in want.items():
        scale = float(w.abs().max()) or 1.0
        assert torch.allclose(got[key], w, atol=tol * scale, rtol=0), key


def covered_by(arch: Architecture, variant: str | None, spelling: str) -> Callable[[Alias], bool]:
    """Aliases whose rows the other spelling covers completely (so that the conversion can place them)."""
    ranges: dict[str, list[tuple[int, int] | None]] = {}
    for a in arch.aliases(variant, spelling=spelling):
        sl = a.target.slice
        ranges.setdefault(a.target.key, []).append(None if sl is None else (sl[1], sl[1] + sl[2]))

    def ok(alias: Alias) -> bool:
        have = ranges.get(alias.target.key)
        if have is None:
            return False
        if None in have:
            return True
        if alias.target.slice is None:
            return False  # a whole weight whose parts only may be covered: skip (kept simple)
        lo, hi = alias.target.slice[1], alias.target.slice[1] + alias.target.slice[2]
        pos = lo
        for r in sorted(x for x in have if x is not None):
            if r[0] <= pos < r[1]:
                pos = r[1]
        return pos >= hi

    return ok


def _fixture(arch: Architecture, variant: str | None, src: str, dst: str, path: Path) -> LoraFixture | None:
    pred = covered_by(arch, variant, dst)
    try:
        return make_lora(
            arch,
            path,
            variant=variant,
            spelling=src,
            modules=lambda a: pred(a) and _small_filter(arch, variant, a),
            limit=6,
            rank=4,
        )
    except ValueError:
        return None


def _small_filter(arch: Architecture, variant: str | None, a: Alias) -> bool:
    from lorasmith.testing import target_spec

    spec = target_spec(arch, arch.check_variant(variant), a.target)
    return spec is not None and len(spec.shape) == 2


def _pairs() -> list[tuple[str, str | None, str, str]]:
    """Every spelling of every family to and from the default (kohya) and PEFT spellings."""
    out = []
    for fam, variant in FAMILIES:
        arch = get(fam)
        hubs = {arch.spellings[0], "peft"}
        for src in arch.spellings:
            for dst in arch.spellings:
                if src != dst and (src in hubs or dst in hubs):
                    out.append((fam, variant, src, dst))
    return out


@pytest.mark.parametrize(("fam", "variant", "src", "dst"), _pairs())
def test_spelling_pairs_keep_deltas_and_round_trip(
    tmp_path: Path, fam: str, variant: str | None, src: str, dst: str
) -> None:
    arch = get(fam)
    fx = _fixture(arch, variant, src, dst, tmp_path / "a.safetensors")
    if fx is None:
        pytest.skip(f"no {src} module of {fam} has a {dst} counterpart")
    b = tmp_path / "b.safetensors"
    r = convert(fx.path, b, to=_word(dst), arch=fam)
    assert r.to_spelling == dst and r.kind == "lora"
    assert_same_deltas(fx, b)
    # every module name is the target spelling's (names it shares with another spelling included: OneTrainer's
    # text-encoder names are kohya's)
    names = {a.name for a in arch.aliases(variant, spelling=dst)}
    with load_lora(b, arch=fam) as lb:
        assert all(n in names for n in lb.modules)
    back = tmp_path / "c.safetensors"
    convert(b, back, to=_word(src), arch=fam)
    assert_same_deltas(fx, back)
    a_t, c_t = by_target(fx.path, fam), by_target(back, fam)
    if _is_peft(src) == _is_peft(dst) or _is_peft(src):
        # no arithmetic, or PEFT -> kohya -> PEFT (alpha = rank on the way, nothing multiplied): bit-exact
        assert set(a_t) == set(c_t)
        for k, t in a_t.items():
            assert torch.equal(t.reshape(c_t[k].shape), c_t[k]), k


def by_target(path: Path, arch: str) -> dict[tuple[Target, str], torch.Tensor]:
    """The file's tensors keyed by (target, suffix): names that are synonyms of one module compare equal."""
    out = {}
    tensors = load_all(path)
    with load_lora(path, arch=arch) as lora:
        for info in lora.modules.values():
            assert info.alias is not None
            for suffix, key in info.keys.items():
                out[(info.alias.target, suffix)] = tensors[key]
    return out


def _word(spelling: str) -> str:
    """The ``--to`` word of a spelling id (``comfy`` is the family default; the literal one: comfy-keys)."""
    return "comfy-keys" if spelling == "comfy" else spelling


def _is_peft(spelling: str) -> bool:
    from lorasmith.archs.base import SPELLINGS

    return SPELLINGS[spelling].suffixes == "peft"


def test_default_is_comfy_and_comfy_is_the_family_default(tmp_path: Path) -> None:
    arch = get("zimage")
    fx = make_lora(arch, tmp_path / "m.safetensors", spelling="musubi", limit=12)
    out = tmp_path / "o.safetensors"
    r = convert(fx.path, out)
    assert r.to_spelling == arch.spellings[0] == "kohya"
    assert r.counts.get("fuse", 0) > 0
    assert r.to_spelling not in arch.comfyui_rejects
    assert_same_deltas(fx, out)


def test_fuse_multiplies_alpha_by_parts(tmp_path: Path) -> None:
    arch = get("zimage")
    names = [f"lora_unet_layers_0_attention_to_{p}" for p in "qkv"]
    fx = make_lora(arch, tmp_path / "m.safetensors", modules=names, rank=4, alpha=2.0)
    out = tmp_path / "o.safetensors"
    convert(fx.path, out, to="kohya")
    t = load_all(out)
    fused = "lora_unet_layers_0_attention_qkv"
    assert t[fused + ".lora_down.weight"].shape[0] == 12
    assert float(t[fused + ".alpha"]) == 6.0  # alpha x 3: alpha / rank kept (not sd-scripts' bug)
    assert_same_deltas(fx, out)
    # and back: the block-diagonal up chunks into the three parts exactly
    back = tmp_path / "b.safetensors"
    convert(out, back, to="musubi")
    a, b = load_all(fx.path), load_all(back)
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fuse_with_different_scales_folds_them(tmp_path: Path) -> None:
    from lorasmith.io.writer import save_file

    arch = get("zimage")
    names = [f"lora_unet_layers_0_attention_to_{p}" for p in "qkv"]
    fx = make_lora(arch, tmp_path / "m.safetensors", modules=names, rank=4, alpha=2.0)
    tensors = dict(load_all(fx.path))
    tensors[names[1] + ".alpha"] = torch.tensor(1.0)
    save_file(tensors, tmp_path / "m2.safetensors")
    out = tmp_path / "o.safetensors"
    convert(tmp_path / "m2.safetensors", out, to="kohya")
    t = load_all(out)
    assert float(t["lora_unet_layers_0_attention_qkv.alpha"]) == 12.0  # scale 1, g folded into up
    got = file_deltas(out, "zimage", {m.target.key: m.target_shape for m in fx.modules.values()})
    want = fx.dense_deltas()
    key = next(iter(want))
    rows = want[key].shape[0] // 3
    want[key][rows : 2 * rows] /= 2  # the k part now has alpha 1 instead of 2
    assert torch.allclose(got[key], want[key], atol=1e-6)


def test_split_fused_flux_and_back_is_bit_exact(tmp_path: Path) -> None:
    arch = get("flux")
    fx = make_lora(
        arch,
        tmp_path / "k.safetensors",
        spelling="kohya",
        modules=lambda a: "single_blocks_0_linear1" in a.name or "double_blocks_1_img_attn_qkv" in a.name,
    )
    out = tmp_path / "p.safetensors"
    r = convert(fx.path, out, to="peft")
    assert r.counts["split"] == 7  # q, k, v, proj_mlp + q, k, v
    assert_same_deltas(fx, out)
    on = tmp_path / "o.safetensors"
    convert(fx.path, on, to="onetrainer")
    back = tmp_path / "b.safetensors"
    convert(on, back, to="kohya")
    a, b = load_all(fx.path), load_all(back)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_lycoris_algorithms_keep_their_suffixes(tmp_path: Path) -> None:
    arch = get("sdxl")
    for algo in ("loha", "lokr", "full", "dora", "locon-tucker"):
        fx = make_lora(
            arch,
            tmp_path / f"{algo}.safetensors",
            spelling="kohya",
            algo=algo,  # type: ignore[arg-type]
            modules=(lambda a: a.component == "unet") if algo != "locon-tucker" else None,
            limit=4,
        )
        out = tmp_path / f"{algo}-lyco.safetensors"
        r = convert(fx.path, out, to="lycoris")
        assert r.counts == {"rename": 4}
        a, b = by_target(fx.path, "sdxl"), by_target(out, "sdxl")
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), algo


def test_loha_into_peft_needs_lossy_and_reports_error(tmp_path: Path) -> None:
    arch = get("sd1")
    fx = make_lora(arch, tmp_path / "h.safetensors", spelling="kohya", algo="loha", limit=4, rank=2)
    out = tmp_path / "p.safetensors"
    with pytest.raises(LorasmithError, match="no exact PEFT form") as info:
        convert(fx.path, out, to="peft")
    assert info.value.hint is not None and "--lossy" in info.value.hint
    assert not out.exists()
    r = convert(fx.path, out, to="peft", lossy=True, lossy_tol=1e-6)
    assert r.counts["lossy"] == 4 and r.max_rel_error is not None and r.max_rel_error <= 1e-6
    assert_same_deltas(fx, out, tol=1e-5)
    r2 = convert(fx.path, tmp_path / "p2.safetensors", to="peft", lossy=True, lossy_rank=1)
    assert r2.max_rel_error is not None and r2.max_rel_error > 0


def test_dora_into_peft_keeps_magnitude(tmp_path: Path) -> None:
    arch = get("sd1")
    fx = make_lora(arch, tmp_path / "d.safetensors", spelling="kohya", algo="dora", limit=3)
    out = tmp_path / "p.safetensors"
    convert(fx.path, out, to="peft")
    t = load_all(out)
    mags = [k for k in t if k.endswith(".lora_magnitude_vector")]
    assert len(mags) == 3 and all(t[k].ndim == 1 for k in mags)
    back = tmp_path / "k.safetensors"
    convert(out, back, to="kohya")
    got = load_all(back)
    for m in fx.modules.values():
        assert torch.equal(got[m.name + ".dora_scale"], fx.tensors[m.name + ".dora_scale"])


def test_dora_cannot_be_fused(tmp_path: Path) -> None:
    arch = get("zimage")
    names = [f"lora_unet_layers_0_attention_to_{p}" for p in "qkv"]
    fx = make_lora(arch, tmp_path / "m.safetensors", modules=names, algo="dora")
    with pytest.raises(LorasmithError, match="DoRA"):
        convert(fx.path, tmp_path / "o.safetensors", to="kohya", lossy=True)


def test_bad_targets(tmp_path: Path) -> None:
    fx = make_lora(get("sd1"), tmp_path / "a.safetensors", limit=2)
    with pytest.raises(UsageError, match="unknown target spelling"):
        convert(fx.path, tmp_path / "o.safetensors", to="nonsense")
    with pytest.raises(LorasmithError, match="no 'musubi' spelling") as info:
        convert(fx.path, tmp_path / "o.safetensors", to="musubi")
    assert info.value.hint is not None and "kohya" in info.value.hint
    assert not (tmp_path / "o.safetensors").exists()


def test_metadata_kept_and_hash_recomputed(tmp_path: Path) -> None:
    fx = make_lora(
        get("flux"),
        tmp_path / "a.safetensors",
        limit=4,
        metadata={"ss_output_name": "x", "sshs_model_hash": "bad"},
    )
    out = tmp_path / "o.safetensors"
    r = convert(fx.path, out, to="peft")
    meta = read_header(out).metadata
    assert meta["ss_output_name"] == "x"
    assert meta["sshs_model_hash"] != "bad" and meta["sshs_model_hash"] == r.sshs_model_hash
    assert json.loads(meta["lorasmith_convert"])["to"] == "peft"


def test_dtype_of_a_lora(tmp_path: Path) -> None:
    fx = make_lora(get("sdxl"), tmp_path / "a.safetensors", limit=4)
    out = tmp_path / "o.safetensors"
    r = convert(fx.path, out, dtype="bf16")
    assert r.to_spelling == fx.spelling  # only a dtype: the spelling is kept
    t = load_all(out)
    assert all(v.dtype == (torch.float32 if k.endswith(".alpha") else torch.bfloat16) for k, v in t.items())
    assert r.cast.tensors == 8


def test_cli(tmp_path: Path) -> None:
    fx = make_lora(get("sd1"), tmp_path / "a.safetensors", limit=2)
    runner = CliRunner()
    out = tmp_path / "o.safetensors"
    res = runner.invoke(app, ["convert", str(fx.path), "-o", str(out), "--to", "peft", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["to_spelling"] == "peft"
    res = runner.invoke(app, ["convert", str(fx.path), "-o", str(out), "--to", "peft"])
    assert res.exit_code == 1 and "already exists" in res.stderr and "Traceback" not in res.output
    res = runner.invoke(app, ["convert", str(fx.path), "-o", str(tmp_path / "x.safetensors"), "--to", "zzz"])
    assert res.exit_code == 2 and "unknown target spelling" in res.stderr


def test_docs_spelling_table_matches_the_families() -> None:
    """docs/convert.md's family x spelling table says what each family's ``spellings`` say."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "convert.md").read_text()
    start = doc.index("| `--to` | sd1")
    rows = doc[start:].split("\n\n", 1)[0].splitlines()[2:]
    families = ["sd1", "sdxl", "flux", "sd3", "zimage"]
    words = {"comfy": "kohya", "comfy-keys": "comfy", "diffusers": "peft"}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        spelling = words.get(cells[0].split("`")[1], cells[0].split("`")[1])
        for family, cell in zip(families, cells[1:], strict=True):
            has = spelling in get(family).spellings
            assert has == (cell != "-"), (family, spelling, cell)
            assert (cell == "default") == (get(family).spellings[0] == spelling), (family, spelling)
