"""Shared test setup."""

import os
import random

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Spawned gloo ranks stay alive between jobs (see dist_quant.parallel.spawn): their imports cost more than most jobs.
os.environ.setdefault("DIST_QUANT_KEEP_RANKS", "1")


@pytest.fixture
def gen() -> torch.Generator:
    """Fresh random data on every run; the seed is printed, so a failure can be replayed with
    DIST_QUANT_TEST_SEED=<seed>."""
    seed = int(os.environ.get("DIST_QUANT_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"random seed: {seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch) -> str:
    """Run a test on the torch reference and on the Triton kernels, interpreted on CPU tensors (with a GPU,
    test_kernels_cuda.py checks the compiled kernels instead)."""
    if request.param == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("interpreted kernels run where there is no GPU")
    monkeypatch.setenv("DIST_QUANT_BACKEND", request.param)
    return request.param
