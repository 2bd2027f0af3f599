"""``inspect`` end to end: families, spellings, algorithms, hashes, spectra, bad files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorasmith.cli import app
from lorasmith.io.writer import save_file
from lorasmith.ops.inspect import inspect_file
from lorasmith.registry import get_registry
from lorasmith.testing import make_checkpoint, make_lora, write_bad_files

runner = CliRunner()

FAMILIES = ["sd1", "sdxl", "flux", "sd3", "zimage"]


@pytest.mark.parametrize("arch_id", FAMILIES)
def test_checkpoint_of_every_family(tmp_path: Path, arch_id: str) -> None:
    arch = get_registry().get(arch_id)
    path = tmp_path / "ckpt.safetensors"
    make_checkpoint(arch, path, dtype=None)
    r = inspect_file(path)
    assert (r.kind, r.arch, r.variant) == ("checkpoint", arch_id, arch.default_variant)
    assert r.confidence == 1.0
    assert r.layout == arch.canonical_inventory().layout
    assert r.lora is None


@pytest.mark.parametrize("arch_id", FAMILIES)
def test_lora_of_every_family_and_spelling(tmp_path: Path, arch_id: str) -> None:
    arch = get_registry().get(arch_id)
    for spelling in arch.spellings:
        path = tmp_path / f"{spelling}.safetensors"
        fx = make_lora(arch, path, spelling=spelling, rank=4, limit=12)
        r = inspect_file(path, keys=True)
        assert r.kind == "lora" and r.arch == arch_id, (spelling, r.reason)
        assert r.layout == spelling
        assert r.lora is not None and r.lora.module_count == len(fx.modules)
        assert r.lora.unresolved == []
        assert r.lora.ranks == {"4": len(fx.modules)}
        assert r.modules is not None and all(m.target for m in r.modules)


@pytest.mark.parametrize("algo", ["lora", "locon-tucker", "loha", "lokr", "full", "dora"])
def test_algorithms_are_named(tmp_path: Path, algo: str) -> None:
    arch = get_registry().get("sd1")
    path = tmp_path / "lyco.safetensors"
    fx = make_lora(arch, path, algo=algo, rank=4, limit=6)
    r = inspect_file(path, blocks=algo != "dora")
    assert r.lora is not None
    assert sum(r.lora.algos.values()) == len(fx.modules)
    if algo != "dora":
        assert r.blocks, "spectra expected"
        assert all(b.sv_max >= b.sv_min >= 0 for b in r.blocks)


def test_alphas_and_metadata_are_read_without_torch(tmp_path: Path) -> None:
    arch = get_registry().get("sdxl")
    path = tmp_path / "lora.safetensors"
    make_lora(
        arch,
        path,
        rank=8,
        alpha=4.0,
        limit=5,
        metadata={
            "ss_network_dim": "8",
            "ss_tag_frequency": json.dumps({"a": {"x": 1}}),
            "modelspec.title": "demo",
        },
    )
    code = (
        "import sys, json; from lorasmith.ops.inspect import inspect_file;"
        f"r = inspect_file({str(path)!r});"
        "print(json.dumps([r.lora.alphas, r.training, r.modelspec, 'torch' in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    alphas, training, modelspec, torch_loaded = json.loads(out.stdout)
    assert alphas == {"4": 5}
    assert training["ss_tag_frequency"] == "<1 entries>"
    assert modelspec == {"title": "demo"}
    assert torch_loaded is False


def test_verify_hash(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "h.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 4)}, path, metadata={"ss_a": "b"})
    assert inspect_file(path, verify_hash=True).hashes.status == "match"
    bad = tmp_path / "bad.safetensors"
    save_file({"w": torch.ones(2)}, bad, metadata={"sshs_model_hash": "0xdeadbeef"}, hashes=False)
    assert inspect_file(bad, verify_hash=True).hashes.status == "lycoris-0x"
    nohash = tmp_path / "nohash.safetensors"
    save_file({"w": torch.ones(2)}, nohash, hashes=False)
    assert inspect_file(nohash, verify_hash=True).hashes.status == "missing"


def test_musubi_zimage_keys_are_flagged_for_comfyui(tmp_path: Path) -> None:
    arch = get_registry().get("zimage")
    if "musubi" not in arch.spellings:
        pytest.skip("zimage has no musubi spelling")
    path = tmp_path / "musubi.safetensors"
    make_lora(arch, path, spelling="musubi", limit=4)
    r = inspect_file(path)
    assert r.lora is not None and r.lora.comfyui_unloaded
    assert any("ComfyUI" in w for w in r.warnings)


def test_unknown_keys_are_reported(tmp_path: Path) -> None:
    import torch

    arch = get_registry().get("sdxl")
    path = tmp_path / "lora.safetensors"
    fx = make_lora(arch, path, limit=3)
    from lorasmith.io.reader import load_all

    tensors = load_all(path)
    tensors["lora_unet_not_a_module.lora_down.weight"] = torch.zeros(4, 8)
    tensors["lora_unet_not_a_module.lora_up.weight"] = torch.zeros(8, 4)
    out = tmp_path / "extra.safetensors"
    save_file(tensors, out)
    r = inspect_file(out)
    assert r.lora is not None and r.lora.unresolved == ["lora_unet_not_a_module"]
    assert r.arch == "sdxl" and r.confidence == pytest.approx(len(fx.modules) / (len(fx.modules) + 1))


def test_cli_renders_and_json(tmp_path: Path) -> None:
    arch = get_registry().get("flux")
    path = tmp_path / "lora.safetensors"
    make_lora(arch, path, limit=4)
    human = runner.invoke(app, ["inspect", str(path), "--keys", "--blocks", "-q"])
    assert human.exit_code == 0, human.output
    assert "FLUX" in human.stdout and "per-block spectra" in human.stdout
    js = runner.invoke(app, ["inspect", str(path), str(path), "--json"])
    assert js.exit_code == 0
    data = json.loads(js.stdout)
    assert isinstance(data, list) and data[0]["arch"] == "flux"


def test_bad_files_exit_1_with_one_line(tmp_path: Path) -> None:
    bad = write_bad_files(tmp_path / "bad")
    bad["missing"] = tmp_path / "nope.safetensors"
    for name, path in bad.items():
        proc = subprocess.run(
            [sys.executable, "-m", "lorasmith", "inspect", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 1, (name, proc.stderr)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr, (name, proc.stderr)
        assert len(lines) <= 2


def test_modules_of_one_shape_share_their_analysis_but_not_their_errors(tmp_path: Path) -> None:
    import torch

    tensors = {}
    for i in range(3):  # three valid modules of one signature, and two invalid ones of another
        tensors[f"lora_unet_m{i}.lora_down.weight"] = torch.zeros(4, 8)
        tensors[f"lora_unet_m{i}.lora_up.weight"] = torch.zeros(8, 4)
    for i in range(2):
        tensors[f"lora_unet_bad{i}.lora_down.weight"] = torch.zeros(4, 8)
        tensors[f"lora_unet_bad{i}.lora_up.weight"] = torch.zeros(8, 3)  # rank 3 against 4
    path = tmp_path / "lora.safetensors"
    save_file(tensors, path)
    r = inspect_file(path, keys=True, arch="sdxl")
    assert r.modules is not None
    rows = {m.name: m for m in r.modules}
    good = [rows[f"lora_unet_m{i}"] for i in range(3)]
    assert [(m.algo, m.rank) for m in good] == [("lora", 4)] * 3
    assert [rows[f"lora_unet_bad{i}"].algo for i in range(2)] == ["invalid", "invalid"]
    for i in range(2):  # each invalid module is reported under its own name
        assert any(f"lora_unet_bad{i}" in w for w in r.warnings), r.warnings
