"""FP8 E4M3 numerics (docs/formats.md): pure torch functions, float32 inside."""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
E4M3_SMALLEST_SUBNORMAL = 2.0**-9


def check_float_input(x: torch.Tensor) -> None:
    if not x.is_floating_point() or x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError(f"expected a float32, bfloat16 or float16 tensor, got {x.dtype}")


def nonzero_amax(amax: torch.Tensor) -> torch.Tensor:
    """An amax of 0 means an all-zero tensor: derive scales from 1.0 so they stay positive and finite."""
    amax = amax.float()
    return torch.where(amax == 0, torch.ones_like(amax), amax)


def divide(t: torch.Tensor, constant: float) -> torch.Tensor:
    """Correctly rounded t / constant. (On CUDA, torch divides by a Python scalar through its reciprocal, which
    can be one ulp off.)"""
    return t / torch.full((), constant, dtype=t.dtype, device=t.device)


def as_amax(amax: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(amax, dtype=torch.float32, device=like.device)


def cast_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round to E4M3, nearest-even; values past the range saturate to +-448 instead of becoming NaN."""
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """The exported `weight_scale` / `input_scale`: amax / 448 in float32 (shape of amax)."""
    return divide(nonzero_amax(amax), E4M3_MAX)


def fp8_quantize(x: torch.Tensor, amax: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (float8_e4m3fn tensor, float32 scale). amax: scalar, or [out, 1] for per-channel scales.

    NaN stays NaN; +-Inf saturates to +-448 (i.e. +-amax after dequantization).
    """
    check_float_input(x)
    scale = fp8_scale(as_amax(amax, x))
    return cast_e4m3(x.float() / scale), scale


def fp8_fake_quant(x: torch.Tensor, amax: torch.Tensor | float) -> torch.Tensor:
    """Quantize to E4M3 with scale amax/448 and dequantize, returned in x's dtype."""
    q, scale = fp8_quantize(x, amax)
    return (q.float() * scale).to(x.dtype)
