"""Dispatch MXFP8, MXFP4, FP8 per-token-group and per-tensor FP8 numerics to the Triton kernels of `mx_triton.py`
on CUDA tensors and to the torch reference (`numerics.mx`, `numerics.fp8_blocks`, `numerics.fp8`) elsewhere, under
the same `DIST_QUANT_BACKEND` choice as NVFP4 (`dist_quant.kernels.use_triton`). Both give the same bits. Dequantization and FP8 weight blocks
(quantized once, at export) have only the reference."""

from __future__ import annotations

import functools

import torch

from dist_quant.kernels import use_triton
from dist_quant.numerics import fp8, fp8_blocks, mx


@functools.cache  # an import statement per call costs more than the lookup
def _kernels():
    from dist_quant.kernels import mx_triton

    return mx_triton


def fp8_fake_quant(x: torch.Tensor, amax: torch.Tensor | float) -> torch.Tensor:
    """`numerics.fp8_fake_quant`; one launch where amax is one value (per-channel amax: the reference)."""
    if not use_triton(x) or (isinstance(amax, torch.Tensor) and amax.numel() != 1):
        return fp8.fp8_fake_quant(x, amax)
    fp8.check_float_input(x)
    return _kernels().triton_fp8_fake_quant(x, fp8.as_amax(amax, x).reshape(()))


def mxfp8_fake_quant(x: torch.Tensor) -> torch.Tensor:
    if not use_triton(x):
        return mx.mxfp8_fake_quant(x)
    mx.check_mx_input(x, "MXFP8 fake quant")
    return _kernels().triton_mxfp8_fake_quant(x)


def mxfp8_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not use_triton(x):
        return mx.mxfp8_quantize(x)
    mx.check_mx_input(x, "MXFP8 quantize")
    return _kernels().triton_mxfp8_quantize(x)


def mxfp4_fake_quant(x: torch.Tensor) -> torch.Tensor:
    if not use_triton(x):
        return mx.mxfp4_fake_quant(x)
    mx.check_mxfp4_input(x, "MXFP4 fake quant")
    return _kernels().triton_mxfp4_fake_quant(x)


def mxfp4_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not use_triton(x):
        return mx.mxfp4_quantize(x)
    mx.check_mxfp4_input(x, "MXFP4 quantize")
    mx.check_no_nan(x)
    return _kernels().triton_mxfp4_quantize(x)


def _group_kernel(x: torch.Tensor, group_size: int) -> bool:
    """The kernel holds a group in one Triton block, whose size must be a power of two."""
    return use_triton(x) and group_size & (group_size - 1) == 0


def fp8_group_fake_quant(
    x: torch.Tensor, group_size: int = fp8_blocks.GROUP_SIZE, scale_format: str = "float32"
) -> torch.Tensor:
    if not _group_kernel(x, group_size):
        return fp8_blocks.fp8_group_fake_quant(x, group_size, scale_format)
    fp8_blocks.check_groups(x, group_size, scale_format, "FP8 group fake quant")
    return _kernels().triton_fp8_group_fake_quant(x, group_size, scale_format)


def fp8_group_quantize(
    x: torch.Tensor, group_size: int = fp8_blocks.GROUP_SIZE, scale_format: str = "float32"
) -> tuple[torch.Tensor, torch.Tensor]:
    if not _group_kernel(x, group_size):
        return fp8_blocks.fp8_group_quantize(x, group_size, scale_format)
    fp8_blocks.check_groups(x, group_size, scale_format, "FP8 group quantize")
    return _kernels().triton_fp8_group_quantize(x, group_size, scale_format)


__all__ = [
    "fp8_fake_quant", "fp8_group_fake_quant", "fp8_group_quantize", "mxfp4_fake_quant", "mxfp4_quantize", "mxfp8_fake_quant",
    "mxfp8_quantize",
]
