"""Triton kernel for each row of a tensor times its own scale (an MoE expert output times its token's routing
weight), in one pass where torch's `(x * scale[:, None]).to(x.dtype)` takes two over a float32 intermediate twice
the size of x. The same bits: the product in float32, correctly rounded (exact where both operands have 16 bits),
then rounded to x's dtype, as torch does whether it promotes the product to float32 or keeps x's dtype."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dist_quant.kernels.launch import INTERPRETED, Launcher
from dist_quant.kernels.nvfp4_triton import _load_f32, _store_from_f32

ROWS_BLOCK = 2048  # elements per program


@triton.jit
def _scale_rows_kernel(x_ptr, scale_ptr, y_ptr, total, n, BLOCK: tl.constexpr, INTERPRETED: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    x = _load_f32(x_ptr, offs, mask, INTERPRETED)
    scale = _load_f32(scale_ptr, offs // n, mask, INTERPRETED)
    _store_from_f32(y_ptr, offs, x * scale, mask, INTERPRETED)


@functools.cache
def _scale_rows() -> Launcher:
    return Launcher(_scale_rows_kernel, {"BLOCK": ROWS_BLOCK, "INTERPRETED": INTERPRETED})


def triton_scale_rows(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Checked input (the dispatcher's): x [rows, n] contiguous, scale [rows] on x's device."""
    y = torch.empty_like(x)
    if x.numel():
        _scale_rows()(triton.cdiv(x.numel(), ROWS_BLOCK), x, scale, y, x.numel(), x.shape[1])
    return y
