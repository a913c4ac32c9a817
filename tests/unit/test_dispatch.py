"""The kernel dispatcher: Triton on CUDA tensors, the reference elsewhere, overridable by DIST_QUANT_BACKEND."""

import pytest
import torch

from dist_quant.kernels import BACKEND_ENV, use_triton


def test_cpu_tensors_use_the_reference_by_default(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert not use_triton(torch.zeros(16))
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert not use_triton(torch.zeros(16))


def test_forcing_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton(torch.zeros(16))
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="needs TRITON_INTERPRET=1"):
        use_triton(torch.zeros(16))


def test_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match="expected one of auto, torch, triton"):
        use_triton(torch.zeros(16))
