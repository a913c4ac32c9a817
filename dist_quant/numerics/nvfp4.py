"""NVFP4 numerics (docs/formats.md): E2M1 codes in blocks of 16 with an E4M3 block scale and a float32
per-tensor scale_2. Pure torch reference; `dist_quant.kernels` holds Triton versions with the same results.

Non-finite input: +-Inf saturates to +-6 x (its block scale); NaN does not enter the block amax and fake quant
returns NaN at exactly the NaN positions. `nvfp4_quantize` rejects NaN: E2M1 cannot encode it.
"""

from __future__ import annotations

from typing import Sequence

import torch

from dist_quant.numerics.fp8 import (
    E4M3_MAX,
    E4M3_SMALLEST_SUBNORMAL,
    as_amax,
    cast_e4m3,
    check_float_input,
    divide,
    nonzero_amax,
)

BLOCK_SIZE = 16
E2M1_MAX = 6.0
SCALE_2_DIVISOR = E2M1_MAX * E4M3_MAX  # 2688

# Signed E2M1 values by 4-bit code: bit 3 is the sign, so code 8 decodes to -0.0.
_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_DECODE = torch.tensor(_E2M1_VALUES + tuple(-v for v in _E2M1_VALUES), dtype=torch.float32)


def check_nvfp4_args(
    x: torch.Tensor, global_amax: torch.Tensor, block_amax: torch.Tensor | None
) -> None:
    """Input validation shared by the reference and the kernels."""
    check_float_input(x)
    if x.dim() == 0 or x.shape[-1] % BLOCK_SIZE:
        raise ValueError(
            f"NVFP4 needs the last dimension to be a multiple of {BLOCK_SIZE}, got shape {tuple(x.shape)}"
        )
    if global_amax.numel() != 1:
        raise ValueError(f"NVFP4 global_amax must be a scalar, got shape {tuple(global_amax.shape)}")
    if block_amax is not None:
        expected = (*x.shape[:-1], x.shape[-1] // BLOCK_SIZE)
        if tuple(block_amax.shape) != expected:
            raise ValueError(
                f"NVFP4 block_amax must have shape {expected} for input {tuple(x.shape)}, "
                f"got {tuple(block_amax.shape)}"
            )


def nvfp4_scale_2(global_amax: torch.Tensor) -> torch.Tensor:
    """The per-tensor second-level scale (`weight_scale_2`): global_amax / 2688, float32 scalar."""
    return nvfp4_scales_2(global_amax).reshape(())


def nvfp4_scales_2(global_amax: torch.Tensor) -> torch.Tensor:
    """`nvfp4_scale_2` of each element of a tensor of global amax (elementwise, same shape)."""
    return divide(nonzero_amax(global_amax), SCALE_2_DIVISOR)


def to_blocks(x: torch.Tensor) -> torch.Tensor:
    return x.float().reshape(*x.shape[:-1], x.shape[-1] // BLOCK_SIZE, BLOCK_SIZE)


def nvfp4_block_amax(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-block amax [..., n/16] in float32; NaN elements are ignored."""
    blocks = to_blocks(x).abs()
    return torch.where(blocks.isnan(), 0.0, blocks).amax(-1)


def nvfp4_block_scale(block_amax: torch.Tensor, scale_2: torch.Tensor) -> torch.Tensor:
    """E4M3 block scales (the exported `weight_scale`). Zero blocks get 1.0; the clamp keeps every byte finite."""
    s = block_amax.float() / (E2M1_MAX * scale_2)
    s = torch.where(s == 0, 1.0, s).clamp(E4M3_SMALLEST_SUBNORMAL, E4M3_MAX)
    return cast_e4m3(s)


def round_to_e2m1_code(v: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code, ties to the even code, saturating at 6; sign bit set exactly when v < 0."""
    a = v.abs()
    magnitude = (
        (a > 0.25).to(torch.uint8)
        + (a >= 0.75)
        + (a > 1.25)
        + (a >= 1.75)
        + (a > 2.5)
        + (a >= 3.5)
        + (a > 5.0)
    )
    return magnitude | ((v < 0).to(torch.uint8) << 3)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    return E2M1_DECODE.to(codes.device)[codes.long()]


def _encode(x: torch.Tensor, global_amax, block_amax):
    """-> (codes uint8 [..., n/16, 16], block scale e4m3 [..., n/16], scale_2)."""
    global_amax = as_amax(global_amax, x)
    check_nvfp4_args(x, global_amax, block_amax)
    scale_2 = nvfp4_scale_2(global_amax)
    if block_amax is None:
        block_amax = nvfp4_block_amax(x)
    block_scale = nvfp4_block_scale(block_amax, scale_2)
    codes = round_to_e2m1_code(to_blocks(x) / (block_scale.float() * scale_2).unsqueeze(-1))
    return codes, block_scale, scale_2


def _decode_blocks(codes: torch.Tensor, block_scale: torch.Tensor, scale_2: torch.Tensor) -> torch.Tensor:
    # value * e4m3 scale is exact in float32 (3 x 4 significant bits): one rounding, at scale_2.
    return decode_e2m1(codes) * block_scale.float().unsqueeze(-1) * scale_2.float()


def nvfp4_fake_quant(
    x: torch.Tensor, global_amax: torch.Tensor | float, block_amax: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize to NVFP4 and dequantize, returned in x's dtype. block_amax None = dynamic blocks."""
    codes, block_scale, scale_2 = _encode(x, global_amax, block_amax)
    y = _decode_blocks(codes, block_scale, scale_2).reshape(x.shape)
    return torch.where(x.isnan(), x.float(), y).to(x.dtype)


def check_segment_args(x: torch.Tensor, global_amax: torch.Tensor, rows: Sequence[int]) -> None:
    if x.dim() != 2 or global_amax.shape != (len(rows),) or sum(rows) != x.shape[0]:
        raise ValueError(
            f"NVFP4 segments: need x [rows, n], one global amax per segment and segment rows summing to x's rows; "
            f"got x {tuple(x.shape)}, global amax {tuple(global_amax.shape)}, {len(rows)} segments of {sum(rows)} rows"
        )


def nvfp4_fake_quant_segments(
    x: torch.Tensor, global_amax: torch.Tensor, rows: Sequence[int], block_amax: torch.Tensor | None = None
) -> torch.Tensor:
    """NVFP4 fake quant of a 2-D x [sum(rows), n] made of consecutive row segments, each with its own global amax:
    rows [sum(rows[:s]), sum(rows[:s + 1])) with global_amax[s] (and the matching rows of block_amax). By
    definition one `nvfp4_fake_quant` per segment (blocks never cross rows); the kernel does it in one launch."""
    check_segment_args(x, global_amax, rows)
    blocks = [None] * len(rows) if block_amax is None else block_amax.split(list(rows))
    parts = [nvfp4_fake_quant(*args) for args in zip(x.split(list(rows)), global_amax, blocks)]
    return torch.cat(parts) if parts else x.clone()


def check_no_nan(x: torch.Tensor) -> None:
    if torch.isnan(x).any():
        raise ValueError("NVFP4 quantize: the input holds NaN, which E2M1 cannot encode")


def _pack(codes: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """E2M1 codes of a tensor of `shape` -> bytes [..., n/2]: element 2i in the low nibble, 2i+1 in the high."""
    codes = codes.reshape(*shape[:-1], shape[-1] // 2, 2)
    return codes[..., 0] | (codes[..., 1] << 4)


def nvfp4_quantize(
    x: torch.Tensor, global_amax: torch.Tensor | float, block_amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (packed uint8 [..., n/2], block_scale float8_e4m3fn [..., n/16], scale_2 float32 scalar).

    Element 2i goes to the low nibble of byte i, element 2i+1 to the high nibble.
    """
    check_no_nan(x)
    codes, block_scale, scale_2 = _encode(x, global_amax, block_amax)
    return _pack(codes, x.shape), block_scale, scale_2


def nvfp4_quantize_segments(
    x: torch.Tensor, global_amax: torch.Tensor, rows: Sequence[int], block_amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`nvfp4_quantize` of a 2-D x [sum(rows), n] made of consecutive row segments, each with its own global amax
    (see `nvfp4_fake_quant_segments`). -> (packed [sum(rows), n/2], block_scale [sum(rows), n/16], scale_2 [S]).
    NaN is not checked here (that would cost a host sync per call): x must be free of it, which the batched
    exporter checks for a whole layer at once."""
    check_segment_args(x, global_amax, rows)
    check_nvfp4_args(x, global_amax[:1], block_amax)
    blocks = [None] * len(rows) if block_amax is None else block_amax.split(list(rows))
    packed, scales = [], []
    for part, amax, part_blocks in zip(x.split(list(rows)), global_amax, blocks):
        codes, block_scale, _ = _encode(part, amax, part_blocks)
        packed.append(_pack(codes, part.shape))
        scales.append(block_scale)
    empty = x.new_empty((0, x.shape[1] // 2), dtype=torch.uint8), x.new_empty((0, x.shape[1] // BLOCK_SIZE), dtype=torch.float8_e4m3fn)
    return (
        torch.cat(packed) if packed else empty[0],
        torch.cat(scales) if scales else empty[1],
        nvfp4_scales_2(global_amax),
    )


def check_dequantize_args(packed: torch.Tensor, block_scale: torch.Tensor) -> None:
    if packed.dtype != torch.uint8 or block_scale.dtype != torch.float8_e4m3fn:
        raise TypeError(
            f"expected packed uint8 and block_scale float8_e4m3fn, got {packed.dtype} and {block_scale.dtype}"
        )
    n = packed.shape[-1] * 2
    if tuple(block_scale.shape) != (*packed.shape[:-1], n // BLOCK_SIZE) or n % BLOCK_SIZE:
        raise ValueError(
            f"block_scale shape {tuple(block_scale.shape)} does not fit packed shape {tuple(packed.shape)}"
        )


def nvfp4_dequantize(
    packed: torch.Tensor,
    block_scale: torch.Tensor,
    scale_2: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of `nvfp4_quantize`: -> tensor [..., 2 * packed.shape[-1]] in dtype."""
    check_dequantize_args(packed, block_scale)
    n = packed.shape[-1] * 2
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(*packed.shape[:-1], n)
    codes = codes.reshape(*packed.shape[:-1], n // BLOCK_SIZE, BLOCK_SIZE)
    y = _decode_blocks(codes, block_scale, scale_2.reshape(()))
    return y.reshape(*packed.shape[:-1], n).to(dtype)
