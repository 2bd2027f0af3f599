"""``lorasmith cache``: latent caches for trainers; the base-norm cache (``norms``, ``info``, ``clear``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

from lorasmith.commands._common import ArchOpt, DeviceOpt, JsonOpt, OverwriteOpt, QuietOpt, guarded
from lorasmith.output import emit, warn
from lorasmith.progress import cli_progress

if TYPE_CHECKING:
    from lorasmith.ops.cache.latents import LatentsCacheResult
    from lorasmith.ops.cache.norms import NormsCacheInfo, NormsCacheResult, NormsClearResult
    from lorasmith.ops.cache.text import TextCacheResult

COMMAND = typer.Typer(
    name="cache",
    help="Write the caches trainers read: VAE latents, text-encoder outputs, base-weight norms.",
    no_args_is_help=True,
    rich_markup_mode=None,
)

ModelOpt = Annotated[
    Path, typer.Option("--model", help="Checkpoint whose VAE / text encoders are used.", dir_okay=False)
]
DatasetOpt = Annotated[
    Path | None, typer.Option("--dataset", help="Folder of training images (and its immediate subfolders).")
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--dataset-config", help="sd-scripts / musubi-tuner dataset TOML.", dir_okay=False),
]


def render_latents(console: Console, r: LatentsCacheResult) -> None:
    """Human-readable summary of a latent caching run."""
    for it in r.items:
        if it.status == "failed":
            console.print(f"[red]failed[/] {escape(it.image)}: {escape(it.error or '')}")
    scaled = f"scaled x{r.scaling_factor:g}" + (f", shifted {r.shift_factor:g}" if r.shift_factor else "")
    console.print(
        f"{r.arch}: {r.images} images, {r.written} written, {r.skipped} skipped (valid), {r.failed} failed"
    )
    console.print(
        f"  format   {r.cache_format}; latents {scaled if r.stores_scaled else 'unscaled'}", markup=False
    )
    if r.buckets:
        console.print("  buckets  " + ", ".join(f"{k}: {v}" for k, v in r.buckets.items()), markup=False)
    if r.old_npz_removed:
        console.print(f"  removed  {len(r.old_npz_removed)} old <stem>.npz latent files", markup=False)


@COMMAND.command("latents")
@guarded
def latents(
    model: ModelOpt,
    dataset: DatasetOpt = None,
    dataset_config: ConfigOpt = None,
    resolution: Annotated[
        str | None, typer.Option("--resolution", help="W or W,H (default: the family's training size).")
    ] = None,
    enable_bucket: Annotated[
        bool, typer.Option("--enable-bucket", help="Bucket images by aspect ratio.")
    ] = False,
    min_bucket_reso: Annotated[int, typer.Option("--min-bucket-reso", help="Smallest bucket side.")] = 256,
    max_bucket_reso: Annotated[int, typer.Option("--max-bucket-reso", help="Largest bucket side.")] = 1024,
    bucket_reso_steps: Annotated[
        int | None, typer.Option("--bucket-reso-steps", help="Bucket step (default 64; 16 for Z-Image).")
    ] = None,
    bucket_no_upscale: Annotated[
        bool,
        typer.Option(
            "--bucket-no-upscale",
            help="With --enable-bucket: buckets follow the image sizes, never enlarging.",
        ),
    ] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per VAE call.")] = 1,
    flip: Annotated[bool, typer.Option("--flip", help="Also cache the flipped image (flip_aug).")] = False,
    alpha_mask: Annotated[bool, typer.Option("--alpha-mask", help="Also store the alpha channel.")] = False,
    vae: Annotated[
        Path | None,
        typer.Option("--vae", help="Take the VAE from this file instead of --model.", dir_okay=False),
    ] = None,
    skip_existing: Annotated[
        bool, typer.Option("--skip-existing/--no-skip-existing", help="Leave valid caches as they are.")
    ] = True,
    latent_dist: Annotated[
        str | None,
        typer.Option(
            "--latent-dist",
            help="sample or mean of the VAE posterior (default: as the family's trainer: sample for "
            "sd-scripts, mean for Z-Image).",
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the latent sampling noise.")] = 0,
    remove_old_npz: Annotated[
        bool,
        typer.Option(
            "--remove-old-npz",
            help="Delete old <stem>.npz latent files next to the images (SD1/2, SDXL), which sd-scripts "
            "would load instead of the new caches.",
        ),
    ] = False,
    dtype: Annotated[
        str, typer.Option("--dtype", help="VAE compute dtype: float32, float16, bfloat16.")
    ] = "float32",
    device: DeviceOpt = "cpu",
    arch: ArchOpt = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """VAE-encode training images into caches next to them, as sd-scripts / musubi-tuner name them.

    Exit code 1 when some images failed (each is listed); the others are cached.
    """
    from lorasmith.ops.cache.latents import cache_latents

    with cli_progress(enabled=not quiet and not as_json) as progress:
        result = cache_latents(
            model,
            dataset=dataset,
            dataset_config=dataset_config,
            arch=arch,
            vae=vae,
            resolution=resolution,
            enable_bucket=enable_bucket,
            min_bucket_reso=min_bucket_reso,
            max_bucket_reso=max_bucket_reso,
            bucket_reso_steps=bucket_reso_steps,
            bucket_no_upscale=bucket_no_upscale,
            batch_size=batch_size,
            flip=flip,
            alpha_mask=alpha_mask,
            skip_existing=skip_existing,
            overwrite=overwrite,
            device=device,
            dtype=dtype,
            latent_dist=latent_dist,  # type: ignore[arg-type]
            seed=seed,
            remove_old_npz=remove_old_npz,
            progress=progress,
        )
    emit(result, as_json, render_latents)
    if result.old_npz:
        # warn() renders markup; file names may hold [brackets]
        warn(
            escape(
                f"{len(result.old_npz)} old <stem>.npz latent files next to the images (first: "
                f"{result.old_npz[0]}): sd-scripts loads them instead of the new caches; "
                "pass --remove-old-npz to delete them"
            )
        )
    if result.failed:
        raise typer.Exit(1)


CacheDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        help="Norms cache folder (default: $LORASMITH_CACHE_DIR/norms or ~/.cache).",
        file_okay=False,
    ),
]


def _render_norms(console: Console, r: NormsCacheResult) -> None:
    console.print(
        f"{r.base}: {r.weights} weights ({r.arch or 'every weight'}), {r.hits} cached, {r.computed} computed",
        markup=False,
    )
    console.print(f"  cache  {r.cache_file or '-'}", markup=False)


@COMMAND.command("norms")
@guarded
def norms(
    base: Annotated[Path, typer.Option("--base", help="Base checkpoint.", dir_okay=False)],
    cache_dir: CacheDirOpt = None,
    device: DeviceOpt = "auto",
    arch: ArchOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Compute the base-weight norms that resize recipes use (spn_ckpt, fro_ckpt) and cache them."""
    from lorasmith.ops.cache.norms import cache_base_norms

    with cli_progress(enabled=not quiet and not as_json) as progress:
        result = cache_base_norms(base, arch=arch, device=device, cache_dir=cache_dir, progress=progress)
    emit(result, as_json, _render_norms)


def _render_info(console: Console, r: NormsCacheInfo) -> None:
    console.print(f"norms cache {r.folder}: {len(r.files)} files, {r.bytes} bytes", markup=False)
    for f in r.files:
        console.print(f"  {f.identity[:16]}  {f.entries:6d} weights  {f.source or '-'}", markup=False)


@COMMAND.command("info")
@guarded
def info(cache_dir: CacheDirOpt = None, as_json: JsonOpt = False) -> None:
    """List the base-norm cache files."""
    from lorasmith.ops.cache.norms import norms_cache_info

    emit(norms_cache_info(cache_dir), as_json, _render_info)


def _render_clear(console: Console, r: NormsClearResult) -> None:
    console.print(f"removed {r.removed} norms cache files from {r.folder}", markup=False)


@COMMAND.command("clear")
@guarded
def clear(
    base: Annotated[
        list[Path] | None, typer.Option("--base", help="Only the cache of this checkpoint (repeatable).")
    ] = None,
    cache_dir: CacheDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove the base-norm cache (all of it, or that of --base files)."""
    from lorasmith.ops.cache.norms import clear_norms_cache

    emit(clear_norms_cache(cache_dir, list(base) if base else None), as_json, _render_clear)


def _render_text(console: Console, r: TextCacheResult) -> None:
    for it in r.items:
        if it.status == "failed":
            console.print(f"[red]failed[/] {escape(it.image)}: {escape(it.error or '')}")
    console.print(
        f"{r.arch}: {r.images} images, {r.written} written, {r.skipped} skipped (valid), {r.failed} failed"
    )
    for slot, where in r.encoders.items():
        console.print(f"  {slot:7s}  {where}", markup=False)
    if r.max_token_length is not None:
        console.print(
            f"  captions {r.max_token_length} tokens ({r.max_token_length // 75} windows of 77)", markup=False
        )
    if r.weighted_captions:
        console.print("  captions weighted ((word), (word:1.3), [word])", markup=False)
    if r.t5_max_length is not None:
        masks = f"t5 mask {'applied' if r.apply_t5_attn_mask else 'not applied'}"
        if r.arch == "sd3":
            masks += f", clip masks {'applied' if r.apply_lg_attn_mask else 'not applied'}"
        console.print(f"  t5       {r.t5_max_length} tokens; {masks}", markup=False)


@COMMAND.command("text")
@guarded
def text(
    model: Annotated[
        Path | None,
        typer.Option("--model", help="Checkpoint (family; SDXL/SD3 text encoders inside).", dir_okay=False),
    ] = None,
    text_encoder: Annotated[
        list[Path] | None,
        typer.Option(
            "--text-encoder",
            help="Text encoder file (clip_l, clip_g, t5xxl; Z-Image: qwen_3_4b or its shards; repeatable).",
            dir_okay=False,
            metavar="FILE",
        ),
    ] = None,
    tokenizer: Annotated[
        Path | None,
        typer.Option(
            "--tokenizer", help="Local tokenizer folder of the first encoder (CLIP-L; Z-Image: Qwen3)."
        ),
    ] = None,
    tokenizer2: Annotated[
        Path | None,
        typer.Option("--tokenizer2", help="Second encoder's tokenizer (SDXL/SD3: CLIP-G; FLUX: T5)."),
    ] = None,
    tokenizer3: Annotated[
        Path | None, typer.Option("--tokenizer3", help="Third encoder's tokenizer (SD3: T5).")
    ] = None,
    dataset: DatasetOpt = None,
    dataset_config: ConfigOpt = None,
    caption_extension: Annotated[
        str | None,
        typer.Option("--caption-extension", help="Caption file extension (default: .caption, then .txt)."),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Captions per encoder call.")] = 8,
    t5_max_length: Annotated[
        int | None,
        typer.Option("--t5-max-length", help="T5 tokens (default 512 FLUX dev, 256 FLUX schnell / SD3)."),
    ] = None,
    max_token_length: Annotated[
        int | None,
        typer.Option(
            "--max-token-length",
            help="SDXL caption tokens: 75 (default), 150 or 225 (sd-scripts' --max_token_length).",
        ),
    ] = None,
    weighted_captions: Annotated[
        bool,
        typer.Option(
            "--weighted-captions",
            help="SDXL: read (word), (word:1.3), [word] and weight the token states (sd-scripts' "
            "--weighted_captions).",
        ),
    ] = False,
    apply_t5_attn_mask: Annotated[
        bool, typer.Option("--apply-t5-attn-mask", help="Mask T5 padding (the trainer's flag).")
    ] = False,
    apply_lg_attn_mask: Annotated[
        bool, typer.Option("--apply-lg-attn-mask", help="Mask CLIP padding (SD3; the trainer's flag).")
    ] = False,
    skip_existing: Annotated[
        bool, typer.Option("--skip-existing/--no-skip-existing", help="Leave valid caches as they are.")
    ] = True,
    dtype: Annotated[
        str, typer.Option("--dtype", help="Encoder compute dtype: float32, float16, bfloat16.")
    ] = "float32",
    device: DeviceOpt = "cpu",
    arch: ArchOpt = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Encode training captions into text-encoder caches next to the images (SDXL, FLUX, SD3, Z-Image).

    Exit code 1 when some images failed (each is listed); the others are cached.
    """
    from lorasmith.ops.cache.text import cache_text

    with cli_progress(enabled=not quiet and not as_json) as progress:
        result = cache_text(
            model,
            text_encoders=list(text_encoder or []),
            tokenizers=[tokenizer, tokenizer2, tokenizer3],
            dataset=dataset,
            dataset_config=dataset_config,
            arch=arch,
            caption_extension=caption_extension,
            batch_size=batch_size,
            t5_max_length=t5_max_length,
            max_token_length=max_token_length,
            weighted_captions=weighted_captions,
            apply_t5_attn_mask=apply_t5_attn_mask,
            apply_lg_attn_mask=apply_lg_attn_mask,
            skip_existing=skip_existing,
            overwrite=overwrite,
            device=device,
            dtype=dtype,
            progress=progress,
        )
    emit(result, as_json, _render_text)
    if result.failed:
        raise typer.Exit(1)
