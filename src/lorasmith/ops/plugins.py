"""List loaded plugins and families, with each family's separate parts (torch-free)."""

from __future__ import annotations

from pydantic import BaseModel

from lorasmith.archs.base import Architecture
from lorasmith.archs.parts import PartCatalog, PartSlot, part_catalog
from lorasmith.errors import LorasmithError, PluginError
from lorasmith.registry import Registry, get_registry


class PluginRow(BaseModel):
    """One loaded plugin."""

    name: str
    version: str
    source: str
    families: list[str]


class PartRow(BaseModel):
    """One part of a family's single-file checkpoint (a :class:`~lorasmith.archs.parts.PartSlot`).

    :ivar name: the slot name (``transformer``, ``vae``, ``clip_l``, ``text_encoder``...).
    :ivar option: the command-line option that gives the part (``--clip-l``).
    :ivar kind: the part kind id of a separate file of it (``clip_l``, ``vae16``...); ``None`` for the
        diffusion model.
    :ivar kind_name: readable kind (``"16-channel VAE"``; ``"diffusion model"``).
    :ivar form: the form id the single file stores the part in (``openclip``, ``ldm``, ``hf``...);
        ``None`` for the diffusion model.
    :ivar file_form: the form id a separate file of the part is written in (``None`` for the diffusion
        model).
    :ivar prefix: the key prefix of the part in the single file.
    :ivar file: the part's file name when split; ``None``: the checkpoint's own name.
    :ivar required: an assembled single file must have it.
    :ivar group: the dtype option that applies (``unet``, ``te`` or ``vae``).
    :ivar variants: the family's variants whose single file has this part.
    """

    name: str
    option: str
    kind: str | None
    kind_name: str
    form: str | None
    file_form: str | None
    prefix: str
    file: str | None
    required: bool
    group: str
    variants: list[str]


class FamilyRow(BaseModel):
    """One loaded family.

    :ivar parts: the parts of its single-file checkpoint, diffusion model first, each listing the variants
        that have it (empty when the family declares no separate parts).
    :ivar part_kinds: ids of the part kinds the family itself introduces (``Architecture.part_kinds``).
    """

    id: str
    name: str
    plugin: str
    variants: list[str]
    spellings: list[str]
    layouts: list[str]
    block_notations: list[str]
    parts: list[PartRow]
    part_kinds: list[str]


class PluginsResult(BaseModel):
    """What ``lorasmith plugins`` shows."""

    plugins: list[PluginRow]
    families: list[FamilyRow]


def _slots_by_variant(arch: Architecture) -> list[tuple[PartSlot, list[str]]]:
    """Each distinct slot of ``arch`` (first-seen order) with the variants that declare it."""
    out: list[tuple[PartSlot, list[str]]] = []
    for variant in arch.variants or (None,):
        for slot in arch.part_slots(variant):
            for seen, variants in out:
                if seen == slot:
                    if variant is not None:
                        variants.append(variant)
                    break
            else:
                out.append((slot, [variant] if variant is not None else []))
    return out


def _part_row(slot: PartSlot, variants: list[str], catalog: PartCatalog) -> PartRow:
    if slot.kind is None:
        kind_name, form, file_form = "diffusion model", None, None
    else:
        kind = catalog.kinds[slot.kind]
        kind_name, form, file_form = kind.name, kind.form(slot.form).id, kind.file_form.id
    return PartRow(
        name=slot.name,
        option=slot.option,
        kind=slot.kind,
        kind_name=kind_name,
        form=form,
        file_form=file_form,
        prefix=slot.prefix,
        file=slot.filename,
        required=slot.required,
        group=slot.group,
        variants=variants,
    )


def _parts(reg: Registry) -> dict[str, tuple[list[PartRow], list[str]]]:
    """Family id -> (part rows, own kind ids), checking each plugin's part declarations in turn.

    :raises PluginError: a family's part declarations are broken (an undeclared or doubly declared kind,
        an unknown form, an exception from its ``part_slots``), naming its plugin.
    """
    checked: list[Architecture] = []
    out: dict[str, tuple[list[PartRow], list[str]]] = {}
    for arch_id, arch in reg.archs().items():
        try:
            # the catalog so far plus this family: an error here is this family's
            catalog = part_catalog([*checked, arch])
            slots = _slots_by_variant(arch)
            rows = [_part_row(slot, variants, catalog) for slot, variants in slots]
        except Exception as exc:  # any failure of plugin code is the plugin's
            plugin = reg.owner(arch_id)
            text = exc.message if isinstance(exc, LorasmithError) else f"{type(exc).__name__}: {exc}"
            raise PluginError(
                f"plugin {plugin!r}: the parts of family {arch_id!r} are broken: {text}",
                hint=f"fix its part declarations, or block it with LORASMITH_BLOCK_PLUGINS={plugin}",
            ) from exc
        checked.append(arch)
        out[arch_id] = (rows, [k.id for k in arch.part_kinds])
    return out


def list_plugins(registry: Registry | None = None) -> PluginsResult:
    """Every registered plugin with its families and their separate parts.

    :param registry: the registry to describe (default: the process-wide one).
    :raises PluginError: a family's part declarations are broken (see :func:`_parts`), or two plugins'
        aliases conflict (:meth:`~lorasmith.registry.Registry.check_extra_aliases`).
    """
    reg = registry if registry is not None else get_registry()
    reg.check_extra_aliases()  # an alias conflict between plugins is reported here, not on first use
    plugins = [
        PluginRow(name=p.name, version=p.version, source=p.source, families=list(p.families))
        for p in reg.plugins()
    ]
    parts = _parts(reg)
    families = []
    for arch_id, arch in reg.archs().items():
        d = arch.describe()
        rows, kinds = parts[arch_id]
        families.append(
            FamilyRow(
                id=arch_id,
                name=d["name"],
                plugin=reg.owner(arch_id),
                variants=d["variants"],
                spellings=d["spellings"],
                layouts=d["layouts"],
                block_notations=d["block_notations"],
                parts=rows,
                part_kinds=kinds,
            )
        )
    return PluginsResult(plugins=plugins, families=families)
