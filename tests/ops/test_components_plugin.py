"""Plugin families declare their own parts: the toy family's text encoder, a test-local family with a
second key form, and the declaration errors."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from test_components import same
from typer.testing import CliRunner

from lorasmith import registry as registry_module
from lorasmith.archs.base import Architecture, LayoutEntry
from lorasmith.archs.parts import (
    PartForm,
    PartKind,
    PartSlot,
    diffusion_model_slot,
    part_catalog,
)
from lorasmith.cli import app
from lorasmith.errors import PluginError
from lorasmith.hookspecs import hookimpl
from lorasmith.io.header import read_header
from lorasmith.io.reader import load_all
from lorasmith.io.writer import save_file
from lorasmith.ops.components import assemble, bake_parts, split
from lorasmith.ops.inspect import inspect_file
from lorasmith.ops.merge import merge
from lorasmith.registry import Registry, detect_part
from lorasmith.testing import make_checkpoint, make_lora, toy


def _renamed() -> Mapping[str, LayoutEntry]:
    """A second form of the toy text encoder: HF-like names, the token table transposed."""
    out = {k: LayoutEntry(((f"text_model.{k}", None),)) for k in toy.te_part_tensors()}
    out["embeddings.token_embedding.weight"] = LayoutEntry(
        (("text_model.token_table_t", None),), transform="transpose"
    )
    return out


RENAMED_TE = PartKind(
    "toy_te2",
    "toy text encoder (two forms)",
    toy.te_part_tensors,
    (PartForm("renamed", "renamed form", _renamed), PartForm("native", "native form")),
)


class TwoFormToy(toy.ToyArch):
    """The toy family, its text encoder split in the renamed form and stored natively in the single file."""

    id: ClassVar[str] = "toy2"
    part_kinds: ClassVar[tuple[PartKind, ...]] = (RENAMED_TE,)
    component_parts: ClassVar[tuple[PartSlot, ...]] = (
        diffusion_model_slot(toy.UNET_PREFIX),
        PartSlot("text_encoder", "toy_te2", toy.TE_PREFIX, "toy_te2.safetensors", form="native"),
    )


class TwoFormPlugin:
    """A test-local plugin registering :class:`TwoFormToy`."""

    @hookimpl
    def lorasmith_register_architectures(self) -> list[type[Architecture]]:
        return [TwoFormToy]


@pytest.fixture
def toy_registry(monkeypatch: pytest.MonkeyPatch) -> Registry:
    """The process-wide registry with the built-in families and the toy family."""
    reg = Registry(autoload=False, plugins=[("toy", toy)])
    monkeypatch.setattr(registry_module, "_REGISTRY", reg)
    return reg


def _split_toy(tmp: Path, reg: Registry) -> tuple[Path, dict[str, Path]]:
    single = tmp / "toy.safetensors"
    make_checkpoint(reg.get("toy"), single, dtype=None)
    (tmp / "parts").mkdir()
    r = split(single, tmp / "parts")
    assert r.arch == "toy"
    return single, {o.slot: Path(o.path) for o in r.outputs}


def test_toy_parts_split_inspect_assemble(toy_registry: Registry, tmp_path: Path) -> None:
    single, parts = _split_toy(tmp_path, toy_registry)
    assert sorted(p.name for p in parts.values()) == ["toy.safetensors", "toy_te.safetensors"]
    te = read_header(parts["text_encoder"]).tensors
    assert "layers.0.self_attn.q_proj.weight" in te and "logit_scale" in te
    r = inspect_file(parts["text_encoder"])
    assert r.kind == "part" and r.arch == "toy" and r.reason == "toy text encoder (used by toy)"
    assert r.components == ["toy_te"]
    assemble(parts, tmp_path / "back.safetensors")
    same(single, tmp_path / "back.safetensors")


def test_toy_parts_through_the_cli(toy_registry: Registry, tmp_path: Path) -> None:
    single, parts = _split_toy(tmp_path, toy_registry)
    runner = CliRunner()
    args = ["convert", "--assemble", "--unet", str(parts["transformer"])]
    res = runner.invoke(app, [*args, "-o", str(tmp_path / "x.safetensors")])
    assert res.exit_code == 1 and "toy needs the toy text encoder: give --text-encoder FILE" in res.stderr
    args += ["--text-encoder", str(parts["text_encoder"]), "-o", str(tmp_path / "c.safetensors"), "--json"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["arch"] == "toy"
    same(single, tmp_path / "c.safetensors")
    args = ["convert", "--assemble", "--unet", str(parts["transformer"]), "--vae", str(parts["text_encoder"])]
    bad = runner.invoke(app, [*args, "-o", str(tmp_path / "y.safetensors")])
    assert bad.exit_code == 2 and "toy has no vae part" in bad.stderr


def test_bake_into_a_plugin_part(toy_registry: Registry, tmp_path: Path) -> None:
    single, parts = _split_toy(tmp_path, toy_registry)
    fam = toy_registry.get("toy")
    make_lora(fam, tmp_path / "l.safetensors", rank=2, seed=3)
    lora = f"{tmp_path / 'l.safetensors'}:0.8"
    merge([lora], base=single, output=tmp_path / "baked.safetensors")
    (tmp_path / "ref").mkdir()
    ref = {o.slot: Path(o.path) for o in split(tmp_path / "baked.safetensors", tmp_path / "ref").outputs}
    res = bake_parts(
        parts["transformer"],
        [lora],
        tmp_path / "t.safetensors",
        parts={"text_encoder": (parts["text_encoder"], tmp_path / "te.safetensors")},
    )
    assert not res.unmatched and not res.skipped
    assert all(o.changed for o in res.outputs)
    same(ref["transformer"], tmp_path / "t.safetensors")
    same(ref["text_encoder"], tmp_path / "te.safetensors")


def test_a_plugin_part_with_two_forms(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    reg = Registry(autoload=False, plugins=[("toy2", TwoFormPlugin())])
    monkeypatch.setattr(registry_module, "_REGISTRY", reg)
    single = tmp_path / "toy2.safetensors"
    make_checkpoint(reg.get("toy2"), single, dtype=None)
    (tmp_path / "p").mkdir()
    parts = {o.slot: Path(o.path) for o in split(single, tmp_path / "p").outputs}
    te = load_all(parts["text_encoder"])
    s = load_all(single)
    assert torch.equal(
        te["text_model.token_table_t"], s[toy.TE_PREFIX + "embeddings.token_embedding.weight"].t()
    )
    found = detect_part(read_header(parts["text_encoder"]))
    assert found is not None and (found.kind, found.form) == ("toy_te2", "renamed")
    assemble(parts, tmp_path / "back.safetensors")
    same(single, tmp_path / "back.safetensors")
    # the single file's own form is accepted too, and names itself in inspect
    native = {k.removeprefix(toy.TE_PREFIX): v for k, v in s.items() if k.startswith(toy.TE_PREFIX)}
    save_file(native, tmp_path / "native.safetensors")
    assert inspect_file(tmp_path / "native.safetensors").reason == (
        "toy text encoder (two forms) (native form) (used by toy2)"
    )
    assemble({**parts, "text_encoder": tmp_path / "native.safetensors"}, tmp_path / "n.safetensors")
    same(single, tmp_path / "n.safetensors")


def test_declaration_errors() -> None:
    class Clash(toy.ToyArch):
        id: ClassVar[str] = "clash"
        part_kinds: ClassVar[tuple[PartKind, ...]] = (PartKind("clip_l", "my clip", toy.te_part_tensors),)

    with pytest.raises(
        PluginError,
        match=r"part kind 'clip_l' is declared twice: by the built-in kinds and by family 'clash'",
    ):
        part_catalog([Clash()])

    class Unknown(toy.ToyArch):
        id: ClassVar[str] = "unknown"
        part_kinds: ClassVar[tuple[PartKind, ...]] = ()
        component_parts: ClassVar[tuple[PartSlot, ...]] = (
            diffusion_model_slot(),
            PartSlot("text_encoder", "nope", toy.TE_PREFIX),
        )

    with pytest.raises(
        PluginError, match=r"family 'unknown' declares a text_encoder part of unknown kind 'nope'"
    ):
        part_catalog([Unknown()])
    # the same kind declared by two families is one kind with two users
    cat = part_catalog([toy.ToyArch(), type("Twin", (toy.ToyArch,), {"id": "twin"})()])
    assert cat.users["toy_te"] == ("toy", "twin")


def test_a_family_without_parts_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class NoParts(toy.ToyArch):
        id: ClassVar[str] = "noparts"
        part_kinds: ClassVar[tuple[PartKind, ...]] = ()
        component_parts: ClassVar[tuple[PartSlot, ...]] = ()

    class Plugin:
        @hookimpl
        def lorasmith_register_architectures(self) -> list[type[Architecture]]:
            return [NoParts]

    reg = Registry(builtins=(), autoload=False, plugins=[("noparts", Plugin())])
    monkeypatch.setattr(registry_module, "_REGISTRY", reg)
    make_checkpoint(reg.get("noparts"), tmp_path / "n.safetensors")
    (tmp_path / "o").mkdir()
    with pytest.raises(Exception, match="family 'noparts' declares no separate parts"):
        split(tmp_path / "n.safetensors", tmp_path / "o")
