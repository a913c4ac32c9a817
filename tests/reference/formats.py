"""An independent reference of FP8 E4M3 and NVFP4, written from the format definition (docs/formats.md).

It shares no code with dist_quant: values come from the bit definitions, rounding is a nearest-value search in a
table with ties going to the even code, and every float32 operation follows the documented formulas in order.
"""

from __future__ import annotations

import torch

F32 = torch.float32


def _e4m3_positive_finite() -> torch.Tensor:
    """Values of codes 0x00..0x7E (0x7F is NaN): exponent bias 7, 3 mantissa bits, subnormals below 2^-6."""
    values = []
    for code in range(0x7F):
        exponent, mantissa = code >> 3, code & 7
        if exponent == 0:
            values.append(mantissa * 2.0**-9)
        else:
            values.append((1 + mantissa / 8) * 2.0 ** (exponent - 7))
    return torch.tensor(values, dtype=torch.float64)


E4M3_TABLE = _e4m3_positive_finite()  # index == code, ascending
E2M1_TABLE = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def nearest_code(magnitude: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest table value (ties to the even index); past the end saturates to the last."""
    m = magnitude.double().clamp(max=table[-1].item())
    hi = torch.searchsorted(table, m).clamp(max=len(table) - 1)
    lo = (hi - 1).clamp(min=0)
    below, above = m - table[lo], table[hi] - m
    take_hi = (above < below) | ((above == below) & (hi % 2 == 0))
    return torch.where(take_hi, hi, lo)


def e4m3_round(x: torch.Tensor) -> torch.Tensor:
    """float32 x, clamped to +-448, rounded to E4M3; the sign is kept (-0.0 too); NaN stays NaN."""
    magnitude = E4M3_TABLE[nearest_code(x.abs().nan_to_num(0.0), E4M3_TABLE)]
    y = torch.where(x.signbit(), -magnitude, magnitude).to(F32)
    return torch.where(x.isnan(), x, y)


def fp8_fake_quant(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    amax = amax.to(F32)
    scale = torch.where(amax == 0, torch.ones_like(amax), amax) / torch.tensor(448.0)
    return (e4m3_round(x.to(F32) / scale) * scale).to(x.dtype)


def nvfp4(x: torch.Tensor, global_amax: torch.Tensor, block_amax: torch.Tensor | None = None):
    """-> dict with codes (int64 [..., n], sign in bit 3), scale_codes (int64 [..., n/16]), scale_2, fake_quant."""
    blocks = x.to(F32).reshape(*x.shape[:-1], x.shape[-1] // 16, 16)
    g = global_amax.to(F32).reshape(())
    scale_2 = torch.where(g == 0, torch.ones_like(g), g) / torch.tensor(2688.0)
    if block_amax is None:
        block_amax = torch.where(blocks.isnan(), 0.0, blocks.abs()).amax(-1)
    s = block_amax.to(F32) / (torch.tensor(6.0) * scale_2)
    s = torch.where(s == 0, torch.ones_like(s), s).clamp(2.0**-9, 448.0)
    scale_codes = nearest_code(s, E4M3_TABLE)
    e4m3_scale = E4M3_TABLE[scale_codes].to(F32)
    v = blocks / (e4m3_scale * scale_2).unsqueeze(-1)
    magnitude_codes = nearest_code(v.abs().nan_to_num(0.0), E2M1_TABLE)
    negative = v < 0
    codes = magnitude_codes + 8 * negative
    values = E2M1_TABLE[magnitude_codes].to(F32)
    values = torch.where(negative, -values, values)
    y = values * e4m3_scale.unsqueeze(-1) * scale_2
    y = torch.where(blocks.isnan(), blocks, y)
    return {
        "codes": codes.reshape(x.shape),
        "scale_codes": scale_codes,
        "scale_2": scale_2,
        "fake_quant": y.reshape(x.shape).to(x.dtype),
    }


def dequantize(packed: torch.Tensor, scale_bytes: torch.Tensor, scale_2: torch.Tensor) -> torch.Tensor:
    """float32 values of packed E2M1 bytes [..., n/2] with E4M3 block scale bytes [..., n/16] (no NaN bytes):
    each code's value times its block scale (exact), times scale_2 (the one rounding)."""
    n = packed.shape[-1] * 2
    codes = torch.stack([packed.long() % 16, packed.long() // 16], -1).reshape(*packed.shape[:-1], n // 16, 16)
    magnitude = E2M1_TABLE[codes % 8].to(F32)
    values = torch.where(codes >= 8, -magnitude, magnitude)
    y = values * E4M3_TABLE[scale_bytes.long()].to(F32).unsqueeze(-1) * scale_2.to(F32)
    return y.reshape(*packed.shape[:-1], n)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Byte i holds element 2i in the low nibble and 2i+1 in the high nibble."""
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return (pairs[..., 0] + 16 * pairs[..., 1]).to(torch.uint8)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bitwise equality (so -0.0 != +0.0); NaN must sit at the same places, payloads aside."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (actual.dtype, actual.shape)
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan), "NaN positions differ"
    int_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[actual.element_size()]
    a, e = actual[~nan].view(int_dtype), expected[~nan].view(int_dtype)
    mismatched = (a != e).nonzero()
    assert len(mismatched) == 0, (
        f"{len(mismatched)} of {e.numel()} elements differ; first: "
        f"{actual[~nan][mismatched[0]].tolist()} != {expected[~nan][mismatched[0]].tolist()}"
    )
