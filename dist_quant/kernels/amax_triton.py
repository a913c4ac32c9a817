"""Triton max calibration: a running amax raised to the amax of a tensor, or of each segment of its rows, in one
launch (`dist_quant.numerics.amax` is the reference; the result is the same float32 value; docs/formats.md,
"Max calibration").

The torch way is several launches per collection: the amax, then the maximum with the running one, and for
segments (an MoE layer's experts) the per-row max, the segment offsets and a segmented reduction; a calibrating
forward of a 48-layer MoE makes hundreds of them, each tens of microseconds of host time. Here each program takes
a tile of rows, keeps each row's largest magnitude as float32 bits with the sign cleared (for non-negative
floats the integer order is the float order, and every NaN lies above +Inf, so a NaN propagates without a float
max, whose NaN handling differs between the GPU and the interpreter), and raises the running amax by an integer
atomic max: once where the tile's rows are all in one segment, else once per row. The running amax must hold
non-negative values (or NaN with the sign bit clear), as every amax does.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dist_quant.kernels.launch import INTERPRETED, Launcher, cdiv
from dist_quant.kernels.nvfp4_triton import _load_f32, _segments_ending_by

# A program's tile: rows, and columns per step along them.
ROWS = 16
COLUMNS = 256


@triton.jit
def _amax_kernel(
    x_ptr, running_ptr, row_ends_ptr, rows, columns, row_stride, n_segments,
    ROWS: tl.constexpr, COLUMNS: tl.constexpr, SEGMENTED: tl.constexpr, INTERPRETED: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = row < rows
    largest = tl.zeros([ROWS], dtype=tl.int32)
    for start in range(0, columns, COLUMNS):
        column = start + tl.arange(0, COLUMNS)
        mask = row_ok[:, None] & (column < columns)[None, :]
        x = _load_f32(x_ptr, row[:, None] * row_stride + column[None, :], mask, INTERPRETED)
        magnitude = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        largest = tl.maximum(largest, tl.max(magnitude, axis=1))
    if SEGMENTED:
        segment = _segments_ending_by(row.to(tl.int32), row_ends_ptr, n_segments)
        first = tl.min(tl.where(row_ok, segment, n_segments), axis=0)
        last = tl.max(tl.where(row_ok, segment, -1), axis=0)
        if first == last:
            tl.atomic_max(running_ptr + first, tl.max(largest, axis=0))
        else:
            tl.atomic_max(running_ptr + segment, largest, mask=row_ok)
    else:
        tl.atomic_max(running_ptr, tl.max(largest, axis=0))


@functools.cache
def _launcher(segmented: bool) -> Launcher:
    constexprs = {"ROWS": ROWS, "COLUMNS": COLUMNS, "SEGMENTED": segmented, "INTERPRETED": INTERPRETED}
    return Launcher(_amax_kernel, constexprs)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, columns] with unit column stride (a copy only where it has none)."""
    x = x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)
    return x if x.stride(-1) == 1 else x.contiguous()


def triton_update_amax_(running: torch.Tensor, x: torch.Tensor, row_ends: torch.Tensor | None = None) -> None:
    """Checked arguments (the dispatcher's). `row_ends`: int32 on x's device, where each segment of x's rows ends
    (cumulative counts); running then has one float32 per segment, else it is one float32."""
    x = _rows(x)
    if x.numel() == 0:
        return
    segmented = row_ends is not None
    _launcher(segmented)(
        cdiv(len(x), ROWS), x, running.view(torch.int32), row_ends if segmented else running, len(x), x.shape[1],
        x.stride(0), row_ends.numel() if segmented else 1,
    )
