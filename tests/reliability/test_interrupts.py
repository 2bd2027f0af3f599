"""SIGINT and SIGTERM in the middle of every writing command: exit code 130, nothing left behind.

Each run is a real process (forked by :class:`harness.CliServer`) whose writes are slowed down
(``throttle``: a sleep before each write), so that the signal surely lands while the output's temporary
file exists; the signal is sent as soon as that file appears. Afterwards: exit code 130, an ``error:``
line saying so, no traceback, an empty output folder (no output, no temporary file) and unchanged inputs.
One more run, in a fresh interpreter and without any slowing down, interrupts a bake of a larger base.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from corpus import Corpus
from harness import CliServer, child_env, file_digest, temp_files, wait_for

Args = Callable[[Corpus, Path], list[str]]


def _o(out: Path) -> str:
    return str(out / "out.safetensors")


#: Every writing command, with inputs from the corpus (the SD1 UNet base has ~700 tensors).
WRITERS: dict[str, tuple[str, Args]] = {
    "merge-bake": ("merge", lambda c, out: ["merge", str(c.lora), "--base", str(c.base), "-o", _o(out)]),
    "merge-models": ("merge", lambda c, out: ["merge", "--models", str(c.base), str(c.tuned), "-o", _o(out)]),
    "merge-lora": ("merge", lambda c, out: ["merge", str(c.lora), str(c.lora), "--rank", "4", "-o", _o(out)]),
    "extract": (
        "extract",
        lambda c, out: [
            "extract",
            "--base",
            str(c.base),
            "--tuned",
            str(c.tuned),
            "--rank",
            "2",
            "-o",
            _o(out),
        ],
    ),
    "resize": ("resize", lambda c, out: ["resize", str(c.lora), "--rank", "2", "-o", _o(out)]),
    "convert": ("convert", lambda c, out: ["convert", str(c.base), "--dtype", "fp16", "-o", _o(out)]),
}
PRESENT = {k: v for k, v in WRITERS.items() if importlib.util.find_spec(f"lorasmith.commands.{v[0]}")}
SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM}


def _interrupt(server: CliServer, argv: list[str], out: Path, sig: int, **kw: object) -> str:
    """Start ``argv``, send ``sig`` once a temporary file shows up in ``out``; return stderr."""
    child = server.start(argv, env={"LORASMITH_CACHE_DIR": str(out.parent / "cache")}, throttle=0.05, **kw)
    seen = wait_for(lambda: temp_files(out) or not _alive(child.pid), timeout=60)
    assert seen and temp_files(out), "no temporary file appeared before the run ended"
    os.kill(child.pid, sig)
    result = server.wait(child, timeout=60)
    assert result.code == 130, str(result)
    assert not result.traceback, str(result)
    assert result.error_lines == ["error: interrupted; no partial output was left"], str(result)
    return result.stderr


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[-1][:1] not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.parametrize("sig", list(SIGNALS))
@pytest.mark.parametrize("command", list(PRESENT))
def test_interrupt_while_writing(
    corpus: Corpus, server: CliServer, tmp_path: Path, command: str, sig: str
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    inputs = [corpus.base, corpus.tuned, corpus.lora]
    before = {p: file_digest(p) for p in inputs}
    _interrupt(server, PRESENT[command][1](corpus, out), out, SIGNALS[sig])
    assert list(out.iterdir()) == []
    assert {p: file_digest(p) for p in inputs} == before


def test_interrupt_keeps_an_existing_output(corpus: Corpus, server: CliServer, tmp_path: Path) -> None:
    """An interrupted --overwrite leaves the old output as it was."""
    out = tmp_path / "out"
    out.mkdir()
    old = out / "out.safetensors"
    old.write_bytes(corpus.lora.read_bytes())
    digest = file_digest(old)
    argv = [*WRITERS["merge-bake"][1](corpus, out), "--overwrite"]
    _interrupt(server, argv, out, signal.SIGTERM)
    assert [p.name for p in out.iterdir()] == ["out.safetensors"]
    assert file_digest(old) == digest


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="needs the 'cache' extra")
@pytest.mark.parametrize("sig", list(SIGNALS))
def test_interrupt_cache_latents(server: CliServer, tmp_path: Path, sig: str) -> None:
    """Latent caches are written one per image: the finished ones stay (each is complete), the one being
    written is removed, nothing else is left."""
    server.preload("diffusers", "lorasmith.ops.cache.latents")
    ckpt, data = tmp_path / "m.safetensors", tmp_path / "data"
    server.exec(_LATENT_INPUTS.format(ckpt=str(ckpt), data=str(data)))
    images = sorted(data.iterdir())
    before = {p: file_digest(p) for p in [ckpt, *images]}
    argv = ["cache", "latents", "--model", str(ckpt), "--dataset", str(data), "--arch", "sd1"]
    _interrupt(server, [*argv, "--resolution", "64", "-q"], data, SIGNALS[sig])
    caches = sorted(p for p in data.iterdir() if p.suffix == ".npz")
    assert temp_files(data) == []
    assert len(caches) < len(images)
    import numpy as np

    for p in caches:  # the ones written before the signal are complete
        with np.load(p) as z:
            assert any(k.startswith("latents") for k in z.files)
    assert {p: file_digest(p) for p in before} == before


_LATENT_INPUTS = """
import numpy as np, torch
from pathlib import Path
from diffusers import AutoencoderKL
from PIL import Image
from lorasmith.io.writer import save_file
from lorasmith.ops.cache.vae import diffusers_to_ldm_vae

torch.manual_seed(0)
vae = AutoencoderKL(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 8, 8, 8], layers_per_block=2,
    latent_channels=4, norm_num_groups=8,
)
tensors = diffusers_to_ldm_vae(vae.state_dict(), "first_stage_model.")
tensors["model.diffusion_model.out.2.weight"] = torch.zeros(4, 8, 3, 3)
save_file({{k: v.contiguous() for k, v in tensors.items()}}, {ckpt!r}, hashes=False)
data = Path({data!r})
data.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
for i in range(12):
    pixels = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(data / f"{{i:02d}}.png")
"""


def test_interrupt_unthrottled_fresh_process(tmp_path: Path) -> None:
    """No slowing down and no fork: a fresh ``python -m lorasmith`` baking into a larger base, SIGINT as
    soon as its temporary file appears (skipped if this machine finishes before the signal lands)."""
    from lorasmith.registry import get
    from lorasmith.testing import make_checkpoint, make_lora

    base, lora = tmp_path / "base.safetensors", tmp_path / "lora.safetensors"
    make_checkpoint(get("sd1"), base, factor=8, components=("unet",))
    make_lora(get("sd1"), lora, rank=4, limit=8, factor=8)
    before = {p: file_digest(p) for p in (base, lora)}
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, **child_env()}
    env.pop("LORASMITH_DEBUG", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorasmith", "merge", str(lora), "--base", str(base), "-o", _o(out), "-q"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    caught = wait_for(lambda: bool(temp_files(out)) or proc.poll() is not None, timeout=120, interval=0.001)
    if not caught or proc.poll() is not None:
        proc.communicate(timeout=120)
        pytest.skip("the bake finished before a signal could be sent")
    proc.send_signal(signal.SIGINT)
    _stdout, stderr = proc.communicate(timeout=120)
    if proc.returncode == 0:  # the signal landed after the output was complete
        pytest.skip("the bake finished as the signal arrived")
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert list(out.iterdir()) == []
    assert {p: file_digest(p) for p in before} == before


def test_signal_while_the_temporary_file_is_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal that arrives while the writer creates its temporary file is held back until the file is
    recorded, then raised: the file is removed all the same."""
    import tempfile

    import torch

    from lorasmith.io import writer as writer_mod

    real = tempfile.mkstemp

    def mkstemp_then_signal(*args: object, **kwargs: object) -> tuple[int, str]:
        made = real(*args, **kwargs)  # type: ignore[call-overload]
        os.kill(os.getpid(), signal.SIGINT)  # blocked here: delivered when the writer unblocks it
        return made  # type: ignore[no-any-return]

    monkeypatch.setattr(writer_mod.tempfile, "mkstemp", mkstemp_then_signal)
    with pytest.raises(KeyboardInterrupt):
        writer_mod.SafetensorsWriter(tmp_path / "o.safetensors", plan={"w": ("F32", [2])})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(KeyboardInterrupt):
        writer_mod.save_file({"w": torch.ones(2)}, tmp_path / "o.safetensors")
    assert list(tmp_path.iterdir()) == []
