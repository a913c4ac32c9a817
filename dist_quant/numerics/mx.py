"""MX numerics (OCP Microscaling, docs/formats.md): MXFP8 (E4M3 elements) and MXFP4 (E2M1 elements), blocks of 32
consecutive elements along the last dimension, one E8M0 scale (a power of two, stored as a biased exponent byte)
per block. Pure torch reference; the rules are ModelOpt 0.47's (mxfp8_tensor.py, mxfp4_tensor.py), so the bytes
equal its exported checkpoints.

The shared exponent of a block is ceil(log2(amax / element_max)), computed exactly from the float32 bits of the
correctly rounded quotient, clamped to the E8M0 range [-127, 127]; no element then exceeds the element maximum
(the OCP spec's suggested floor(log2(amax)) - emax_elem lets the largest ones saturate).
"""

from __future__ import annotations

import torch

from dist_quant.numerics.fp8 import E4M3_MAX, cast_e4m3, check_float_input, divide
from dist_quant.numerics.nvfp4 import E2M1_MAX, _pack as pack_e2m1_codes, decode_e2m1

MX_BLOCK_SIZE = 32
E8M0_BIAS = 127
E8M0_NAN = 0xFF
E8M0_MIN_EXPONENT, E8M0_MAX_EXPONENT = -127, 127  # bytes 0x00 and 0xFE

# E2M1 magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 and the midpoints between neighbours.
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def shared_exponent(block_amax: torch.Tensor, element_max: float) -> torch.Tensor:
    """int32 ceil(log2(block_amax / element_max)) of each block, clamped to [-127, 127]; an amax of 0 gives -127 and
    +Inf gives 127. Exact: the quotient (float32, correctly rounded) is 2^k when its frexp mantissa is 1/2, and
    rounds up to the next power of two otherwise. (ModelOpt 0.47 takes torch.log2 of the quotient, which rounds to
    the integer k for float32 quotients a few ulps above 2^k: docs/formats.md.)"""
    ratio = divide(block_amax.float(), element_max).clamp(2.0**E8M0_MIN_EXPONENT, 2.0**E8M0_MAX_EXPONENT)
    mantissa, exponent = torch.frexp(ratio)
    return exponent - (mantissa == 0.5).to(exponent.dtype)


def decode_e8m0(scales: torch.Tensor) -> torch.Tensor:
    """float32 2^(byte - 127) of E8M0 bytes, built from the float32 bits (exact, whatever exp2 does on a
    backend): 0x00 is the subnormal 2^-127, 0xFF is NaN."""
    biased = scales.to(torch.int32)
    values = (biased << 23).view(torch.float32)
    values = torch.where(biased == 0, 2.0**E8M0_MIN_EXPONENT, values)
    return torch.where(biased == E8M0_NAN, float("nan"), values)


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """float32 [..., ceil(n/32), 32], the last block padded with zeros (which never raise its amax)."""
    n = x.shape[-1]
    padded = torch.nn.functional.pad(x.float(), (0, -n % MX_BLOCK_SIZE))
    return padded.reshape(*x.shape[:-1], -1, MX_BLOCK_SIZE)


def nan_free_amax(blocks: torch.Tensor, dims: tuple[int, ...] = (-1,)) -> torch.Tensor:
    """max |x| over dims (a block's); NaN elements count as 0 (an all-NaN block has amax 0)."""
    magnitudes = blocks.abs()
    return torch.where(magnitudes.isnan(), 0.0, magnitudes).amax(dims)


def _scaled(blocks: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """blocks / 2^exponent: a product with the exact power of two 2^-exponent, so one rounding at most (only
    below float32's normal range)."""
    return blocks * decode_e8m0(E8M0_BIAS - exponent).unsqueeze(-1)


def check_mx_input(x: torch.Tensor, name: str) -> None:
    check_float_input(x)
    if x.dim() == 0:
        raise ValueError(f"{name} needs a tensor of at least one dimension, got a scalar")


def _check_scales(scales: torch.Tensor, leading: torch.Size, n: int, name: str) -> None:
    expected = (*leading, -(-n // MX_BLOCK_SIZE))
    if scales.dtype != torch.uint8 or tuple(scales.shape) != expected:
        raise ValueError(
            f"{name}: scales must be uint8 E8M0 bytes of shape {expected}, got {scales.dtype} {tuple(scales.shape)}"
        )


# ---------------------------------------------------------------------------------------------------------------
# MXFP8


def mxfp8_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (values float8_e4m3fn [..., n], scales uint8 [..., ceil(n/32)]).

    A last dimension that is no multiple of 32 ends in a partial block (ModelOpt's MXFP8QTensor.quantize pads it
    with zeros). values = cast_e4m3(x / 2^e) with e = `shared_exponent(block amax, 448)`, scale byte e + 127.
    NaN stays NaN (and does not enter the block amax); +-Inf makes its block's exponent 127 and becomes +-448.
    """
    check_mx_input(x, "MXFP8 quantize")
    blocks = _blocks(x)
    exponent = shared_exponent(nan_free_amax(blocks), E4M3_MAX)
    values = cast_e4m3(_scaled(blocks, exponent)).reshape(*x.shape[:-1], -1)[..., : x.shape[-1]]
    return values, (exponent + E8M0_BIAS).to(torch.uint8)


def mxfp8_dequantize(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `mxfp8_quantize`: value x 2^(byte - 127), exact in float32 (an overflow is Inf), then one rounding
    to dtype. A 0xFF (NaN) scale byte makes its block NaN."""
    if values.dtype != torch.float8_e4m3fn:
        raise ValueError(f"MXFP8 dequantize: values must be float8_e4m3fn, got {values.dtype}")
    _check_scales(scales, values.shape[:-1], values.shape[-1], "MXFP8 dequantize")
    y = _blocks(values) * decode_e8m0(scales).unsqueeze(-1)
    return y.reshape(*values.shape[:-1], -1)[..., : values.shape[-1]].to(dtype)


def mxfp8_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """MXFP8 quantize and dequantize, in x's dtype: what an engine computes from the exported tensors."""
    return mxfp8_dequantize(*mxfp8_quantize(x), dtype=x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# MXFP4


def round_to_e2m1_code_ties_down(v: torch.Tensor) -> torch.Tensor:
    """ModelOpt 0.47's E2M1 rounding (MXFP4QTensor.quantize's cast_fp4): the magnitude code counts the midpoints
    that |v| strictly exceeds, so a tie goes to the smaller magnitude, and above 5 (Inf too) saturates to 6. The
    sign bit is set unless v > 0: +0.0 is stored as 0x8 too."""
    a = v.abs()
    magnitude = torch.zeros_like(a, dtype=torch.uint8)
    for midpoint in _E2M1_MIDPOINTS:
        magnitude += a > midpoint
    return magnitude | ((~(v > 0)).to(torch.uint8) << 3)


def check_mxfp4_input(x: torch.Tensor, name: str) -> None:
    check_mx_input(x, name)
    if x.shape[-1] % MX_BLOCK_SIZE:
        raise ValueError(
            f"{name} needs the last dimension to be a multiple of {MX_BLOCK_SIZE}, got shape {tuple(x.shape)}"
        )


def check_no_nan(x: torch.Tensor) -> None:
    if torch.isnan(x).any():
        raise ValueError("MXFP4 quantize: the input holds NaN, which E2M1 cannot encode")


def _mxfp4_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (E2M1 codes [..., n/32, 32], shared exponents int32 [..., n/32])."""
    blocks = _blocks(x)
    exponent = shared_exponent(nan_free_amax(blocks), E2M1_MAX)
    return round_to_e2m1_code_ties_down(_scaled(blocks, exponent)), exponent


def mxfp4_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (packed uint8 [..., n/2], scales uint8 [..., n/32]); n must be a multiple of 32.

    Codes: `round_to_e2m1_code_ties_down(x / 2^e)` with e = `shared_exponent(block amax, 6)`, packed as NVFP4
    packs them (element 2i in the low nibble of byte i). E2M1 has no NaN: NaN input is refused.
    """
    check_mxfp4_input(x, "MXFP4 quantize")
    check_no_nan(x)
    codes, exponent = _mxfp4_codes(x)
    return pack_e2m1_codes(codes, x.shape), (exponent + E8M0_BIAS).to(torch.uint8)


def _decode_mxfp4(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    # An E2M1 value times a power of two is exact in float32 (a product past the range is Inf).
    return decode_e2m1(codes) * decode_e8m0(scales).unsqueeze(-1)


def mxfp4_dequantize(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `mxfp4_quantize`: -> [..., 2 * packed.shape[-1]] in dtype (code 0x8 is -0.0)."""
    n = packed.shape[-1] * 2
    if packed.dtype != torch.uint8 or n % MX_BLOCK_SIZE:
        raise ValueError(
            f"MXFP4 dequantize: packed must be uint8 with 16 bytes per block, got {packed.dtype} {tuple(packed.shape)}"
        )
    _check_scales(scales, packed.shape[:-1], n, "MXFP4 dequantize")
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1, MX_BLOCK_SIZE)
    return _decode_mxfp4(codes, scales).reshape(*packed.shape[:-1], n).to(dtype)


def mxfp4_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """MXFP4 quantize and dequantize, in x's dtype. NaN does not enter the block amax and comes out at exactly the
    NaN positions (`mxfp4_quantize` refuses it)."""
    check_mxfp4_input(x, "MXFP4 fake quant")
    codes, exponent = _mxfp4_codes(x)
    y = _decode_mxfp4(codes, (exponent + E8M0_BIAS).to(torch.uint8)).reshape(x.shape)
    return torch.where(x.isnan(), x.float(), y).to(x.dtype)
