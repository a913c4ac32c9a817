"""Dispatch NVFP4 numerics to Triton kernels on CUDA tensors and to the torch reference elsewhere.

`DIST_QUANT_BACKEND` overrides the choice: `auto` (default), `torch` (always the reference) or `triton` (always
the kernels; on CPU tensors that needs TRITON_INTERPRET=1, which is how the tests check the kernels).
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import os
from typing import Sequence

import torch

from dist_quant.numerics import amax as amax_reference
from dist_quant.numerics import mse
from dist_quant.numerics import nvfp4 as reference
from dist_quant.numerics.fp8 import as_amax

BACKEND_ENV = "DIST_QUANT_BACKEND"
BACKENDS = ("auto", "torch", "triton")


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(x: torch.Tensor) -> bool:
    choice = os.environ.get(BACKEND_ENV, "auto")
    if choice == "auto":  # the hot path: every fake quant of a forward asks
        return x.is_cuda and _triton_installed()
    if choice not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={choice!r}: expected one of {', '.join(BACKENDS)}")
    if choice == "torch":
        return False
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"{BACKEND_ENV}=triton on a CPU tensor needs TRITON_INTERPRET=1")
    return True


@functools.cache  # an import statement per call costs more than the lookup
def _kernels():
    from dist_quant.kernels import nvfp4_triton

    return nvfp4_triton


def nvfp4_fake_quant(
    x: torch.Tensor, global_amax: torch.Tensor | float, block_amax: torch.Tensor | None = None
) -> torch.Tensor:
    if not use_triton(x):
        return reference.nvfp4_fake_quant(x, global_amax, block_amax)
    global_amax = as_amax(global_amax, x)
    reference.check_nvfp4_args(x, global_amax, block_amax)
    return _kernels().triton_nvfp4_fake_quant(x, global_amax, block_amax)


def nvfp4_fake_quant_segments(
    x: torch.Tensor,
    global_amax: torch.Tensor,
    rows: Sequence[int],
    block_amax: torch.Tensor | None = None,
    row_ends: torch.Tensor | None = None,
) -> torch.Tensor:
    """`row_ends`: the segments' cumulative row counts as an int32 tensor on x's device, where the caller has them
    (the experts' token offsets of an MoE layer): spares the kernel's copy of them to the device."""
    if not use_triton(x):
        return reference.nvfp4_fake_quant_segments(x, global_amax, rows, block_amax)
    reference.check_segment_args(x, global_amax, rows)
    if x.numel() == 0:
        return x.clone()
    global_amax = global_amax.to(x.device, torch.float32)
    reference.check_nvfp4_args(x, global_amax[:1], block_amax)
    if parts := _equal_parts(rows):
        return _kernels().triton_nvfp4_fake_quant(x, global_amax, block_amax, parts=parts)
    if row_ends is None:
        row_ends = _row_ends(tuple(rows), x.device)
    return _kernels().triton_nvfp4_fake_quant(x, global_amax, block_amax, row_ends)


def _equal_parts(rows: Sequence[int]) -> int:
    """The number of segments where all have the same rows (a role's expert weights), else 0: equal segments are
    launched as parts, whose programs know their segment from the grid, with no lookup of segment ends (see
    `nvfp4_triton._program_blocks`)."""
    return len(rows) if len(rows) <= _kernels().MAX_PARTS and len(set(rows)) == 1 else 0


@functools.lru_cache(maxsize=64)
def _row_ends(rows: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Where each segment of rows ends, on the device (int32). Kept: a role of expert weights has the same
    segments in every layer and forward, and each host-to-device copy costs tens of microseconds of host time.
    Never written to by its users."""
    # Pageable memory copied without waiting for the GPU: the host buffer is staged at once.
    return torch.tensor(list(itertools.accumulate(rows)), dtype=torch.int32).to(device, non_blocking=True)


def nvfp4_quantize(
    x: torch.Tensor, global_amax: torch.Tensor | float, block_amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not use_triton(x):
        return reference.nvfp4_quantize(x, global_amax, block_amax)
    global_amax = as_amax(global_amax, x)
    reference.check_nvfp4_args(x, global_amax, block_amax)
    reference.check_no_nan(x)
    return _kernels().triton_nvfp4_quantize(x, global_amax, block_amax)


def nvfp4_quantize_segments(
    x: torch.Tensor, global_amax: torch.Tensor, rows: Sequence[int], block_amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See `numerics.nvfp4.nvfp4_quantize_segments`: x must hold no NaN (not checked: no host sync)."""
    if not use_triton(x):
        return reference.nvfp4_quantize_segments(x, global_amax, rows, block_amax)
    reference.check_segment_args(x, global_amax, rows)
    global_amax = global_amax.to(x.device, torch.float32)
    reference.check_nvfp4_args(x, global_amax[:1], block_amax)
    if x.numel() == 0:
        return reference.nvfp4_quantize_segments(x, global_amax, rows, block_amax)
    if parts := _equal_parts(rows):
        packed, block_scale, scale_2 = _kernels().triton_nvfp4_quantize(x, global_amax, block_amax, parts=parts)
        return packed, block_scale, scale_2.reshape(parts)  # one part: the kernel's scalar
    return _kernels().triton_nvfp4_quantize(x, global_amax, block_amax, _row_ends(tuple(rows), x.device))


def nvfp4_dequantize(
    packed: torch.Tensor,
    block_scale: torch.Tensor,
    scale_2: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    rows: Sequence[int] | None = None,
) -> torch.Tensor:
    """`numerics.nvfp4_dequantize`; with `rows`, of consecutive row segments of a 2-D `packed`, `scale_2` holding
    one value per segment (the inverse of `nvfp4_quantize_segments`)."""
    if not use_triton(packed):
        if rows is None:
            return reference.nvfp4_dequantize(packed, block_scale, scale_2, dtype)
        parts = zip(packed.split(list(rows)), block_scale.split(list(rows)), scale_2)
        return torch.cat([reference.nvfp4_dequantize(*part, dtype) for part in parts])
    reference.check_dequantize_args(packed, block_scale)
    if rows is not None:
        reference.check_segment_args(packed, scale_2, rows)
    scale_2 = scale_2.to(packed.device, torch.float32).contiguous()
    packed, block_scale = packed.contiguous(), block_scale.contiguous()
    if rows is None:
        return _kernels().triton_nvfp4_dequantize(packed, block_scale, scale_2, dtype)
    if parts := _equal_parts(rows):
        return _kernels().triton_nvfp4_dequantize(packed, block_scale, scale_2, dtype, parts=parts)
    return _kernels().triton_nvfp4_dequantize(packed, block_scale, scale_2, dtype, _row_ends(tuple(rows), packed.device))


def update_amax_(running: torch.Tensor, x: torch.Tensor) -> None:
    """running (a float32 scalar on x's device, holding an amax) = max(running, `numerics.amax.tensor_amax(x)`),
    in place: one launch on CUDA."""
    _check_running(running, x, 1)
    if not use_triton(x):
        torch.maximum(running, amax_reference.tensor_amax(x), out=running)
        return
    from dist_quant.kernels.amax_triton import triton_update_amax_

    triton_update_amax_(running, x)


def update_segment_amax_(running: torch.Tensor, x: torch.Tensor, lengths: torch.Tensor, row_ends: torch.Tensor) -> None:
    """running [segments] (float32 on x's device, amaxes) = max(running, `numerics.amax.segment_amax(x,
    lengths)`), in place; `row_ends` (int32, on x's device) the cumulative sums of `lengths`: one launch on CUDA."""
    _check_running(running, x, len(row_ends))
    if row_ends.dtype != torch.int32 or row_ends.device != x.device:
        raise ValueError(f"row_ends must be int32 on {x.device}, got {row_ends.dtype} on {row_ends.device}")
    if not use_triton(x):
        torch.maximum(running, amax_reference.segment_amax(x, lengths), out=running)
        return
    from dist_quant.kernels.amax_triton import triton_update_amax_

    triton_update_amax_(running, x, row_ends)


def _check_running(running: torch.Tensor, x: torch.Tensor, values: int) -> None:
    if (running.dtype != torch.float32 or running.device != x.device or running.numel() != values
            or not running.is_contiguous()):
        raise ValueError(
            f"a running amax must be {values} contiguous float32 values on {x.device}, got {tuple(running.shape)} "
            f"{running.dtype} on {running.device}"
        )


def nvfp4_mse_block_amax(w: torch.Tensor, global_amax: torch.Tensor | float) -> torch.Tensor:
    if not use_triton(w):
        return mse.nvfp4_mse_block_amax(w, global_amax)
    global_amax = as_amax(global_amax, w)
    mse.check_mse_args(w, global_amax)
    from dist_quant.kernels.nvfp4_mse_triton import triton_nvfp4_mse_block_amax

    return triton_nvfp4_mse_block_amax(w, global_amax)


__all__ = [
    "BACKEND_ENV", "nvfp4_dequantize", "nvfp4_fake_quant", "nvfp4_fake_quant_segments", "nvfp4_mse_block_amax",
    "nvfp4_quantize", "nvfp4_quantize_segments", "update_amax_", "update_segment_amax_", "use_triton",
]
