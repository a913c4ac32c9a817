"""Fused NVFP4 MSE sweep, bit-identical to `dist_quant.numerics.mse.nvfp4_mse_block_amax`.

Each thread owns whole 16-element blocks: it loads a block's magnitudes once into 16 registers and evaluates all
126 FP8 scale candidates on them, keeping the best error and candidate. The error of a block is summed as the
reference's fixed pairwise tree, with FMA contraction off (enable_fp_fusion=False) so that every product and sum
rounds as written; the quotient uses the same exact reciprocal-plus-residual step as the fake-quant kernel.
Every candidate shares one scale over the whole tensor (E * scale_2), so its reciprocal is a per-program scalar.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dist_quant.kernels.launch import INTERPRETED, Launcher, cdiv
from dist_quant.kernels.nvfp4_triton import _e2m1_round, _load_f32, _scale_2
from dist_quant.numerics.nvfp4 import BLOCK_SIZE

MSE_BLOCKS = 128  # blocks (= threads) per program
MSE_WARPS = 4


@triton.jit
def _e4m3_value(code):
    """Float32 value of positive E4M3 codes 1..126: 2^-9 steps below 2^-6, else (1 + m/8) 2^(e-7)."""
    exponent = code >> 3
    mantissa = code & 7
    normal = (((exponent + 120) << 23) | (mantissa << 20)).to(tl.float32, bitcast=True)
    return tl.where(exponent == 0, mantissa.to(tl.float32) * 0.001953125, normal)


@triton.jit
def _squared_error(a, scale, inverse, e4m3, scale_2):
    """(|w| - dequantized)^2 of one element under one candidate, rounded as the reference does."""
    m, _ = _e2m1_round(a, scale, inverse, scale_2)
    d = a - (m * e4m3) * scale_2
    return d * d


@triton.jit
def _block_error(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, scale, inverse, e4m3, s2):
    """The pairwise tree of the reference: ((e0 + e1) + (e2 + e3)) + ... over 16 elements."""
    p0 = _squared_error(a0, scale, inverse, e4m3, s2) + _squared_error(a1, scale, inverse, e4m3, s2)
    p1 = _squared_error(a2, scale, inverse, e4m3, s2) + _squared_error(a3, scale, inverse, e4m3, s2)
    p2 = _squared_error(a4, scale, inverse, e4m3, s2) + _squared_error(a5, scale, inverse, e4m3, s2)
    p3 = _squared_error(a6, scale, inverse, e4m3, s2) + _squared_error(a7, scale, inverse, e4m3, s2)
    p4 = _squared_error(a8, scale, inverse, e4m3, s2) + _squared_error(a9, scale, inverse, e4m3, s2)
    p5 = _squared_error(a10, scale, inverse, e4m3, s2) + _squared_error(a11, scale, inverse, e4m3, s2)
    p6 = _squared_error(a12, scale, inverse, e4m3, s2) + _squared_error(a13, scale, inverse, e4m3, s2)
    p7 = _squared_error(a14, scale, inverse, e4m3, s2) + _squared_error(a15, scale, inverse, e4m3, s2)
    return ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7))


@triton.jit
def _nvfp4_mse_kernel(w_ptr, out_ptr, global_amax_ptr, n_blocks, BLOCKS: tl.constexpr, INTERPRETED: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    ok = rows < n_blocks
    base = rows * 16
    a0 = tl.abs(_load_f32(w_ptr, base + 0, ok, INTERPRETED))
    a1 = tl.abs(_load_f32(w_ptr, base + 1, ok, INTERPRETED))
    a2 = tl.abs(_load_f32(w_ptr, base + 2, ok, INTERPRETED))
    a3 = tl.abs(_load_f32(w_ptr, base + 3, ok, INTERPRETED))
    a4 = tl.abs(_load_f32(w_ptr, base + 4, ok, INTERPRETED))
    a5 = tl.abs(_load_f32(w_ptr, base + 5, ok, INTERPRETED))
    a6 = tl.abs(_load_f32(w_ptr, base + 6, ok, INTERPRETED))
    a7 = tl.abs(_load_f32(w_ptr, base + 7, ok, INTERPRETED))
    a8 = tl.abs(_load_f32(w_ptr, base + 8, ok, INTERPRETED))
    a9 = tl.abs(_load_f32(w_ptr, base + 9, ok, INTERPRETED))
    a10 = tl.abs(_load_f32(w_ptr, base + 10, ok, INTERPRETED))
    a11 = tl.abs(_load_f32(w_ptr, base + 11, ok, INTERPRETED))
    a12 = tl.abs(_load_f32(w_ptr, base + 12, ok, INTERPRETED))
    a13 = tl.abs(_load_f32(w_ptr, base + 13, ok, INTERPRETED))
    a14 = tl.abs(_load_f32(w_ptr, base + 14, ok, INTERPRETED))
    a15 = tl.abs(_load_f32(w_ptr, base + 15, ok, INTERPRETED))
    scale_2 = _scale_2(tl.load(global_amax_ptr).to(tl.float32))
    best_error = tl.full([BLOCKS], float("inf"), tl.float32)
    best_code = tl.full([BLOCKS], 1, tl.int32)
    for code in range(1, 127):
        e4m3 = _e4m3_value(code)
        scale = e4m3 * scale_2
        inverse = tl.div_rn(1.0, scale)
        error = _block_error(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, scale, inverse, e4m3, scale_2)
        better = error < best_error  # strict: the lowest candidate wins ties
        best_error = tl.where(better, error, best_error)
        best_code = tl.where(better, code, best_code)
    g = tl.load(global_amax_ptr).to(tl.float32)
    g = tl.where(g == 0.0, 1.0, g)
    amax = tl.div_rn(_e4m3_value(best_code), 448.0) * g
    tl.store(out_ptr + rows, amax, mask=ok)


@functools.cache  # by constexprs, looked up per call: bench_mse's launch sweep sets the module constants
def _mse(blocks: int, warps: int) -> Launcher:
    options = {} if INTERPRETED else {"enable_fp_fusion": False}
    return Launcher(_nvfp4_mse_kernel, {"BLOCKS": blocks, "INTERPRETED": INTERPRETED}, num_warps=warps, **options)


def triton_nvfp4_mse_block_amax(w: torch.Tensor, global_amax: torch.Tensor) -> torch.Tensor:
    w = w.contiguous()
    n_blocks = w.numel() // BLOCK_SIZE
    out = torch.empty((*w.shape[:-1], w.shape[-1] // BLOCK_SIZE), dtype=torch.float32, device=w.device)
    _mse(MSE_BLOCKS, MSE_WARPS)(cdiv(n_blocks, MSE_BLOCKS), w, out, global_amax, n_blocks)
    return out
