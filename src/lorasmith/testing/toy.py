"""A tiny, complete family for tests: ``toy``.

It has what the real families have, at a few hundred keys: two variants (``small`` with 2 blocks, ``large``
with 3), a canonical layout with component prefixes and a bare diffusers-style layout, a fused ``qkv``
weight that the PEFT spelling addresses as three row slices, 1x1 and 3x3 convs, a text encoder with an
integer ``position_ids`` tensor and a 0-d ``logit_scale``, two LoRA spellings (``kohya`` and ``peft``) and
one block notation. The text encoder is the same in both variants, so a text-encoder-only LoRA cannot tell
them apart (as with SD1/SD2 UNet-only LoRAs).

It also declares its separate parts as a plugin does (:attr:`ToyArch.part_kinds`,
:attr:`ToyArch.component_parts`): the text encoder ships as ``toy_te.safetensors`` (part kind ``toy_te``,
keys as under ``text_encoder.`` in the single file), which ``convert --split``/``--assemble``, ``inspect`` and
``merge --base ... --text-encoder F --text-encoder-out O`` then handle like a built-in part.

It is not registered by default. Register it in a test with::

    from lorasmith.registry import Registry
    from lorasmith.testing import toy

    registry = Registry(builtins=(), autoload=False, plugins=[("toy", toy)])

Its inventories are built in code (:meth:`ToyArch.inventories`), which is also how a plugin may ship a
family without data files.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import cached_property
from typing import ClassVar

from lorasmith.archs.base import Alias, Architecture, Inventory, Target, TensorSpec, first_index, kohya_name
from lorasmith.archs.parts import PartKind, PartSlot, diffusion_model_slot
from lorasmith.hookspecs import hookimpl

#: Real (unshrunk) sizes of the toy model; all multiples of 64 except the kernel, latent and token sizes.
HIDDEN = 256
MLP = 1024
CHANNELS = 128
LATENT = 4
TE_HIDDEN = 128
TE_MLP = 512
VOCAB = 640
POSITIONS = 77
TE_LAYERS = 2
BLOCKS: Mapping[str, int] = {"small": 2, "large": 3}

UNET_PREFIX = "model.diffusion_model."
TE_PREFIX = "text_encoder."


def _te_tensors() -> Iterator[tuple[str, tuple[int, ...], str]]:
    yield "embeddings.token_embedding.weight", (VOCAB, TE_HIDDEN), "F32"
    yield "embeddings.position_embedding.weight", (POSITIONS, TE_HIDDEN), "F32"
    yield "embeddings.position_ids", (1, POSITIONS), "I64"
    for n in range(TE_LAYERS):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            yield f"layers.{n}.self_attn.{proj}.weight", (TE_HIDDEN, TE_HIDDEN), "F32"
            yield f"layers.{n}.self_attn.{proj}.bias", (TE_HIDDEN,), "F32"
        yield f"layers.{n}.mlp.fc1.weight", (TE_MLP, TE_HIDDEN), "F32"
        yield f"layers.{n}.mlp.fc1.bias", (TE_MLP,), "F32"
        yield f"layers.{n}.mlp.fc2.weight", (TE_HIDDEN, TE_MLP), "F32"
        yield f"layers.{n}.mlp.fc2.bias", (TE_HIDDEN,), "F32"
    yield "logit_scale", (), "F32"


def te_part_tensors() -> Mapping[str, TensorSpec]:
    """The tensors of the toy text encoder as a separate file (the :attr:`PartKind.tensors` of ``toy_te``)."""
    return {k: TensorSpec(s, d) for k, s, d in _te_tensors()}


#: The toy text encoder as a separate part file (a plugin's own part kind).
TOY_TE = PartKind("toy_te", "toy text encoder", te_part_tensors)


def _canon_unet(blocks: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    yield "conv_in.weight", (CHANNELS, LATENT, 3, 3)
    yield "conv_in.bias", (CHANNELS,)
    for n in range(blocks):
        b = f"blocks.{n}"
        yield f"{b}.norm.weight", (HIDDEN,)
        yield f"{b}.norm.bias", (HIDDEN,)
        yield f"{b}.proj_in.weight", (HIDDEN, CHANNELS, 1, 1)
        yield f"{b}.proj_in.bias", (HIDDEN,)
        yield f"{b}.attn.qkv.weight", (3 * HIDDEN, HIDDEN)
        yield f"{b}.attn.qkv.bias", (3 * HIDDEN,)
        yield f"{b}.attn.proj.weight", (HIDDEN, HIDDEN)
        yield f"{b}.attn.proj.bias", (HIDDEN,)
        yield f"{b}.mlp.fc1.weight", (MLP, HIDDEN)
        yield f"{b}.mlp.fc1.bias", (MLP,)
        yield f"{b}.mlp.fc2.weight", (HIDDEN, MLP)
        yield f"{b}.mlp.fc2.bias", (HIDDEN,)
        yield f"{b}.conv.weight", (CHANNELS, CHANNELS, 3, 3)
        yield f"{b}.conv.bias", (CHANNELS,)
    yield "out.weight", (LATENT, CHANNELS, 3, 3)
    yield "out.bias", (LATENT,)


def _diffusers_unet(blocks: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    yield "conv_in.weight", (CHANNELS, LATENT, 3, 3)
    yield "conv_in.bias", (CHANNELS,)
    for n in range(blocks):
        b = f"transformer_blocks.{n}"
        yield f"{b}.norm.weight", (HIDDEN,)
        yield f"{b}.norm.bias", (HIDDEN,)
        yield f"{b}.proj_in.weight", (HIDDEN, CHANNELS, 1, 1)
        yield f"{b}.proj_in.bias", (HIDDEN,)
        for proj in ("to_q", "to_k", "to_v"):
            yield f"{b}.attn.{proj}.weight", (HIDDEN, HIDDEN)
            yield f"{b}.attn.{proj}.bias", (HIDDEN,)
        yield f"{b}.attn.to_out.0.weight", (HIDDEN, HIDDEN)
        yield f"{b}.attn.to_out.0.bias", (HIDDEN,)
        yield f"{b}.ff.net.0.proj.weight", (MLP, HIDDEN)
        yield f"{b}.ff.net.0.proj.bias", (MLP,)
        yield f"{b}.ff.net.2.weight", (HIDDEN, MLP)
        yield f"{b}.ff.net.2.bias", (HIDDEN,)
        yield f"{b}.conv.weight", (CHANNELS, CHANNELS, 3, 3)
        yield f"{b}.conv.bias", (CHANNELS,)
    yield "conv_out.weight", (LATENT, CHANNELS, 3, 3)
    yield "conv_out.bias", (LATENT,)


def build_inventories(family: str = "toy") -> tuple[Inventory, ...]:
    """The three toy inventories: ``toy-small-canon``, ``toy-large-canon``, ``toy-small-diffusers``."""
    out: list[Inventory] = []
    for variant, blocks in BLOCKS.items():
        tensors = {UNET_PREFIX + k: TensorSpec(s, "F16") for k, s in _canon_unet(blocks)}
        tensors.update({TE_PREFIX + k: TensorSpec(s, d) for k, s, d in _te_tensors()})
        out.append(
            Inventory(
                id=f"{family}-{variant}-canon",
                family=family,
                variant=variant,
                layout="canon",
                canonical=True,
                components={"unet": UNET_PREFIX, "te": TE_PREFIX},
                optional=frozenset({TE_PREFIX + "embeddings.position_ids"}),
                tensors=tensors,
                description=f"toy {variant}: single-file layout",
            )
        )
    out.append(
        Inventory(
            id=f"{family}-small-diffusers",
            family=family,
            variant="small",
            layout="diffusers",
            canonical=False,
            components={"unet": ""},
            optional=frozenset(),
            tensors={k: TensorSpec(s, "F16") for k, s in _diffusers_unet(BLOCKS["small"])},
            description="toy small: bare diffusers-style UNet",
        )
    )
    return tuple(out)


class ToyArch(Architecture):
    """The toy family (see the module docstring). Subclass it in tests to break one thing at a time."""

    id: ClassVar[str] = "toy"
    name: ClassVar[str] = "Toy family"
    variants: ClassVar[tuple[str, ...]] = ("small", "large")
    spellings: ClassVar[tuple[str, ...]] = ("kohya", "peft")
    modelspec: ClassVar[Mapping[str, str]] = {"small": "toy-small", "large": "toy-large"}
    base_model_version: ClassVar[Mapping[str, str]] = {"small": "toy_small", "large": "toy_large"}
    part_kinds: ClassVar[tuple[PartKind, ...]] = (TOY_TE,)
    component_parts: ClassVar[tuple[PartSlot, ...]] = (
        diffusion_model_slot(UNET_PREFIX),
        PartSlot("text_encoder", "toy_te", TE_PREFIX, "toy_te.safetensors"),
    )

    @cached_property
    def _toy_inventories(self) -> tuple[Inventory, ...]:
        return build_inventories(self.id)

    def inventories(self) -> tuple[Inventory, ...]:
        """The inventories built by :func:`build_inventories`."""
        return self._toy_inventories

    def _build_aliases(self, variant: str) -> Iterable[Alias]:
        blocks = BLOCKS[variant]
        u = UNET_PREFIX
        for n in range(blocks):
            b = f"blocks.{n}"
            for path in ("proj_in", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "conv"):
                yield Alias(
                    kohya_name("lora_unet_", f"{b}.{path}"), "kohya", Target(f"{u}{b}.{path}.weight"), "unet"
                )
            p = f"transformer.transformer_blocks.{n}"
            qkv = f"{u}{b}.attn.qkv.weight"
            for i, proj in enumerate(("to_q", "to_k", "to_v")):
                yield Alias(f"{p}.attn.{proj}", "peft", Target(qkv, (0, i * HIDDEN, HIDDEN)), "unet")
            for path, canon in (
                ("attn.to_out.0", "attn.proj"),
                ("ff.net.0.proj", "mlp.fc1"),
                ("ff.net.2", "mlp.fc2"),
                ("proj_in", "proj_in"),
            ):
                yield Alias(f"{p}.{path}", "peft", Target(f"{u}{b}.{canon}.weight"), "unet")
        for path in ("conv_in", "out"):
            yield Alias(kohya_name("lora_unet_", path), "kohya", Target(f"{u}{path}.weight"), "unet")
        for n in range(TE_LAYERS):
            for path in (
                *(f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")),
                "mlp.fc1",
                "mlp.fc2",
            ):
                key = f"{TE_PREFIX}layers.{n}.{path}.weight"
                yield Alias(kohya_name("lora_te_", f"layers.{n}.{path}"), "kohya", Target(key), "te")
                yield Alias(f"text_encoder.layers.{n}.{path}", "peft", Target(key), "te")

    def block_of(self, key: str) -> str | None:
        """``BASE`` for the text encoder, ``IN``/``OUT`` for the outer convs, ``Bnn`` for block ``nn``."""
        if key.startswith(TE_PREFIX):
            return "BASE"
        path = key[len(UNET_PREFIX) :] if key.startswith(UNET_PREFIX) else key
        if path.startswith("conv_in."):
            return "IN"
        if path.startswith(("out.", "conv_out.")):
            return "OUT"
        n = first_index(path, "blocks")
        if n is None:
            n = first_index(path, "transformer_blocks")
        return None if n is None else f"B{n:02d}"

    def block_notations(self) -> Mapping[str, Sequence[str]]:
        """One notation, ``toy``: ``BASE``, ``IN``, ``B00``..``B02``, ``OUT``."""
        return {"toy": ["BASE", "IN", *(f"B{n:02d}" for n in range(max(BLOCKS.values()))), "OUT"]}


@hookimpl
def lorasmith_register_architectures() -> list[type[Architecture]]:
    """Register :class:`ToyArch` (only when this module is registered as a plugin)."""
    return [ToyArch]
