"""Device resolution and the compute dtype policy."""

from __future__ import annotations

import pytest
import torch

from lorasmith.linalg import LinalgError, compute_dtype, resolve_device, to_compute


def fake_cuda(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """Pretend that ``count`` CUDA devices are visible (0: none), without touching a real GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


@pytest.mark.parametrize("spec", ["cpu", "CPU", " cpu "])
def test_cpu(spec: str) -> None:
    assert resolve_device(spec) == torch.device("cpu")


def test_auto_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, 0)
    assert resolve_device("auto") == torch.device("cpu")


def test_auto_and_cuda_with_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_cuda_not_available(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, 0)
    with pytest.raises(LinalgError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(LinalgError, match="CUDA is not available"):
        resolve_device("cuda:0")


def test_cuda_index_out_of_range(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, 2)
    with pytest.raises(LinalgError, match="2 CUDA device"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:x", "cuda:-1", "mps", ""])
def test_unknown_specs(monkeypatch: pytest.MonkeyPatch, spec: str) -> None:
    fake_cuda(monkeypatch, 1)
    with pytest.raises(LinalgError, match="unknown device"):
        resolve_device(spec)


def test_compute_dtype() -> None:
    cpu = torch.device("cpu")
    assert compute_dtype(cpu) == torch.float32
    assert compute_dtype(cpu, test_mode=True) == torch.float64


def test_to_compute() -> None:
    t = torch.ones(3, 2, dtype=torch.float16, requires_grad=True)
    out = to_compute(t, torch.device("cpu"), torch.float32)
    assert out.dtype == torch.float32
    assert not out.requires_grad
    assert t.dtype == torch.float16
    same = torch.zeros(2, dtype=torch.float32)
    assert to_compute(same, torch.device("cpu"), torch.float32) is same
    with pytest.raises(LinalgError, match="floating point"):
        to_compute(same, torch.device("cpu"), torch.int64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_cuda() -> None:
    device = resolve_device("cuda")
    assert device.type == "cuda"
    assert to_compute(torch.ones(2), device, torch.float32).device.type == "cuda"
