"""Triton kernels for the block formats with power-of-two or float32 block scales, bit-identical to
`dist_quant.numerics.mx` (MXFP8, MXFP4) and `dist_quant.numerics.fp8_blocks` (FP8 per-token groups), and for FP8
with one per-tensor scale (`dist_quant.numerics.fp8`: K/V caches and FP8 recipes, where torch's ops took a dozen
launches per call).

One program handles `BLOCKS` blocks (of 32 elements for MX, of the group size for FP8 groups). Every rounding is
float32 arithmetic that is exact by construction or correctly rounded, without the backend's FP8 conversion:
- Shared exponent: q = div_rn(amax, element max), clamped to [2^-127, 2^127]; from q's bits, its exponent field
  minus 127, plus one unless the mantissa field is zero (a subnormal q is 2^-127, or rounds up to 2^-126).
- Scaling by 2^k: a product with the float32 2^k built from its bits; the one power outside float32's normal
  range, 2^-127, is applied as 2^-63 then 2^-64, which rounds the same wherever the result can be nonzero.
- E4M3: |v| clamped to 448, then 3 mantissa bits rounded from the float32 bits (ties to even) in the normal range
  and `(a + 2^14) - 2^14` below 2^-6 (the float32 ulp of 2^14 is the E4M3 subnormal step 2^-9).
- E2M1 (MXFP4, ModelOpt's rounding): the magnitude code counts the midpoints |v| strictly exceeds.
- FP8 quotients x / scale (groups and per tensor): RN(1/scale) and one FMA residual step (Markstein), the correctly rounded
  quotient; an infinite scale gives x x 0 (+-0, or NaN for +-Inf), as the division does.
- Signs multiply (Triton's unary minus is `0 - v`, which would turn -0.0 into +0.0).
Loads, stores and the NaN-free block max under TRITON_INTERPRET=1 are nvfp4_triton's.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dist_quant.kernels.launch import INTERPRETED, Launcher, cdiv
from dist_quant.kernels.nvfp4_triton import _block_amax, _e2m1_magnitude, _load_f32, _store_from_f32
from dist_quant.numerics.fp8_blocks import GROUP_AMAX_FLOOR
from dist_quant.numerics.mx import MX_BLOCK_SIZE

MX_BLOCKS = 64  # 32-element blocks per program
GROUP_BLOCKS = 16  # token groups per program
FP8_TENSOR_BLOCK = 2048  # elements per program


@triton.jit
def _power_of_two(k):
    """float32 2^k for integer k in [-126, 127], from its bits."""
    return ((k + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _times_power_of_two(v, k):
    """v x 2^k for integer k in [-127, 127], rounded once (2^-127 applied in two normal steps)."""
    split = tl.where(k < -126, -64, 0)
    return (v * _power_of_two(k - split)) * _power_of_two(split)


@triton.jit
def _shared_exponent(amax, element_max):
    """int32 ceil(log2(RN(amax / element_max))), clamped to [-127, 127] (numerics.mx.shared_exponent)."""
    q = tl.div_rn(amax, element_max)
    # 2^-127 from its bits: a float32 subnormal, which as a Python literal compiled Triton would make a float64
    smallest = tl.full(q.shape, 0x00400000, tl.int32).to(tl.float32, bitcast=True)
    q = tl.minimum(tl.maximum(q, smallest), 1.7014118346046923e38)  # 2^127
    bits = q.to(tl.int32, bitcast=True)
    field, mantissa = bits >> 23, bits & 0x7FFFFF
    # a subnormal q lies in [2^-127, 2^-126): mantissa field 0x400000 is 2^-127 itself
    return tl.where(field == 0, -127 + (mantissa > 0x400000).to(tl.int32), field - 127 + (mantissa != 0).to(tl.int32))


@triton.jit
def _e4m3_round(v):
    """-> (nearest E4M3 magnitude of |v| clamped to 448, ties to even, as float32; v's sign bit). NaN gives NaN."""
    a = tl.minimum(tl.abs(v), 448.0)
    bits = a.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
    subnormal = (a + 16384.0) - 16384.0
    magnitude = tl.where(a < 0.015625, subnormal, normal)
    magnitude = tl.where(v == v, magnitude, v)
    return magnitude, (v.to(tl.int32, bitcast=True) >> 31) != 0


@triton.jit
def _e4m3_byte(magnitude, negative):
    """The E4M3 byte of a rounded magnitude (NaN -> 0x7F) and sign: biased exponent 7, 3 mantissa bits."""
    bits = magnitude.to(tl.int32, bitcast=True)
    normal = (((bits >> 23) - 120) << 3) | ((bits >> 20) & 7)
    code = tl.where(magnitude >= 0.015625, normal, (magnitude * 512.0).to(tl.int32))
    code = tl.where(magnitude == magnitude, code, 0x7F)
    return tl.where(negative, code | 0x80, code)


@triton.jit
def _signed(magnitude, negative):
    return tl.where(negative, magnitude * -1.0, magnitude)


@triton.jit
def _mxfp8_kernel(
    x_ptr, out_ptr, scale_ptr, n_blocks, n, blocks_per_row,
    FAKE: tl.constexpr, BLOCKS: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """FAKE: out = the dequantized values in out's dtype; else out = E4M3 bytes and scale = E8M0 bytes."""
    blocks = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    block_ok = blocks < n_blocks
    columns = (blocks % blocks_per_row)[:, None] * 32 + tl.arange(0, 32)[None, :]
    mask = block_ok[:, None] & (columns < n)
    offs = (blocks // blocks_per_row)[:, None] * n + columns
    x = _load_f32(x_ptr, offs, mask, INTERPRETED)
    exponent = _shared_exponent(_block_amax(x, INTERPRETED), 448.0)
    magnitude, negative = _e4m3_round(_times_power_of_two(x, -exponent[:, None]))
    if FAKE:
        y = _signed(_times_power_of_two(magnitude, exponent[:, None]), negative)
        _store_from_f32(out_ptr, offs, y, mask, INTERPRETED)
    else:
        tl.store(out_ptr + offs, _e4m3_byte(magnitude, negative).to(tl.uint8), mask=mask)
        tl.store(scale_ptr + blocks, (exponent + 127).to(tl.uint8), mask=block_ok)


@triton.jit
def _e2m1_code_ties_down(v):
    """ModelOpt's cast_fp4: magnitude code = midpoints 0.25 .. 5 that |v| strictly exceeds; sign bit unless v > 0."""
    a = tl.abs(v)
    code = ((a > 0.25).to(tl.int32) + (a > 0.75).to(tl.int32) + (a > 1.25).to(tl.int32) + (a > 1.75).to(tl.int32)
            + (a > 2.5).to(tl.int32) + (a > 3.5).to(tl.int32) + (a > 5.0).to(tl.int32))
    return tl.where(v > 0.0, code, code | 8)


@triton.jit
def _mxfp4_kernel(
    x_ptr, out_ptr, scale_ptr, n_blocks,
    FAKE: tl.constexpr, BLOCKS: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """Whole 32-element blocks (the last dimension is a multiple of 32). FAKE: out = dequantized values (NaN where
    x is NaN); else out = packed codes (element 2i in the low nibble) and scale = E8M0 bytes."""
    blocks = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    block_ok = blocks < n_blocks
    if FAKE:  # whole blocks, loaded and stored contiguously
        offs = blocks[:, None] * 32 + tl.arange(0, 32)[None, :]
        x = _load_f32(x_ptr, offs, block_ok[:, None], INTERPRETED)
        exponent = _shared_exponent(_block_amax(x, INTERPRETED), 6.0)[:, None]
        code = _e2m1_code_ties_down(_times_power_of_two(x, -exponent))
        y = _signed(_times_power_of_two(_e2m1_magnitude(code & 7), exponent), (code & 8) != 0)  # code 8 is -0.0
        _store_from_f32(out_ptr, offs, tl.where(x == x, y, x), block_ok[:, None], INTERPRETED)
    else:  # even and odd elements apart, to pack them two a byte
        pairs = tl.arange(0, 16)[None, :]
        even_offs = blocks[:, None] * 32 + 2 * pairs
        even = _load_f32(x_ptr, even_offs, block_ok[:, None], INTERPRETED)
        odd = _load_f32(x_ptr, even_offs + 1, block_ok[:, None], INTERPRETED)
        exponent = _shared_exponent(tl.maximum(_block_amax(even, INTERPRETED), _block_amax(odd, INTERPRETED)), 6.0)
        even_code = _e2m1_code_ties_down(_times_power_of_two(even, -exponent[:, None]))
        odd_code = _e2m1_code_ties_down(_times_power_of_two(odd, -exponent[:, None]))
        packed = (even_code | (odd_code << 4)).to(tl.uint8)
        tl.store(out_ptr + blocks[:, None] * 16 + pairs, packed, mask=block_ok[:, None])
        tl.store(scale_ptr + blocks, (exponent + 127).to(tl.uint8), mask=block_ok)


@triton.jit
def _divide(a, b, b_inverse):
    """a / b correctly rounded, from b_inverse = RN(1 / b) and one FMA residual step (Markstein). Where the first
    product is not finite or b is infinite (b_inverse 0) it is kept: it is then exact (+-0 keeps its sign) or NaN
    as it should be. The residual underflows only for quotients below 2^-52 at scales >= 2^-42, which E4M3 rounds to 0
    either way. The magnitude is exact, not the sign of a zero: a = -0 gives +0 (-0 + +0), so callers take the sign
    from a."""
    q = a * b_inverse
    corrected = tl.fma(tl.fma(-b, q, a), b_inverse, q)
    return tl.where((tl.abs(q) < float("inf")) & (b_inverse != 0.0), corrected, q)


@triton.jit
def _fp8_group_kernel(
    x_ptr, out_ptr, scale_ptr, n_groups, amax_floor,
    GROUP: tl.constexpr, UE8M0: tl.constexpr, FAKE: tl.constexpr, BLOCKS: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """FP8 per-token groups of GROUP consecutive elements (numerics.fp8_blocks). FAKE: out = dequantized values in
    out's dtype; else out = E4M3 bytes and scale = float32 scales."""
    groups = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    group_ok = groups < n_groups
    offs = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    x = _load_f32(x_ptr, offs, group_ok[:, None], INTERPRETED)
    amax = tl.maximum(_block_amax(x, INTERPRETED), amax_floor)
    if UE8M0:
        scale = tl.where(amax < float("inf"), _power_of_two(_shared_exponent(amax, 448.0)), amax)
    else:
        scale = tl.div_rn(amax, 448.0)
    magnitude, _ = _e4m3_round(_divide(x, scale[:, None], tl.div_rn(1.0, scale)[:, None]))
    negative = (x.to(tl.int32, bitcast=True) >> 31) != 0  # x's sign: the divide's residual step turns -0 into +0
    if FAKE:
        _store_from_f32(out_ptr, offs, _signed(magnitude * scale[:, None], negative), group_ok[:, None], INTERPRETED)
    else:
        tl.store(out_ptr + offs, _e4m3_byte(magnitude, negative).to(tl.uint8), mask=group_ok[:, None])
        tl.store(scale_ptr + groups, scale, mask=group_ok)


@triton.jit
def _fp8_tensor_kernel(x_ptr, y_ptr, amax_ptr, n, BLOCK: tl.constexpr, INTERPRETED: tl.constexpr):
    """FP8 fake quant with one scale, RN(amax / 448) (an amax of 0 counts as 1), in y's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = _load_f32(x_ptr, offs, mask, INTERPRETED)
    amax = tl.load(amax_ptr).to(tl.float32)
    scale = tl.div_rn(tl.where(amax == 0.0, 1.0, amax), 448.0)
    zeros = tl.zeros_like(x)  # scale and its inverse as vectors, as _divide takes them
    magnitude, _ = _e4m3_round(_divide(x, scale + zeros, tl.div_rn(1.0, scale) + zeros))
    negative = (x.to(tl.int32, bitcast=True) >> 31) != 0  # x's sign: the divide's residual step turns -0 into +0
    _store_from_f32(y_ptr, offs, _signed(magnitude * scale, negative), mask, INTERPRETED)


@functools.cache
def _mxfp8(fake: bool) -> Launcher:
    return Launcher(_mxfp8_kernel, {"FAKE": fake, "BLOCKS": MX_BLOCKS, "INTERPRETED": INTERPRETED})


@functools.cache
def _mxfp4(fake: bool) -> Launcher:
    return Launcher(_mxfp4_kernel, {"FAKE": fake, "BLOCKS": MX_BLOCKS, "INTERPRETED": INTERPRETED})


@functools.cache
def _fp8_groups(group: int, ue8m0: bool, fake: bool) -> Launcher:
    constexprs = {"GROUP": group, "UE8M0": ue8m0, "FAKE": fake, "BLOCKS": GROUP_BLOCKS, "INTERPRETED": INTERPRETED}
    return Launcher(_fp8_group_kernel, constexprs)


@functools.cache
def _fp8_tensor() -> Launcher:
    return Launcher(_fp8_tensor_kernel, {"BLOCK": FP8_TENSOR_BLOCK, "INTERPRETED": INTERPRETED})


def _mxfp8_launch(x: torch.Tensor, out: torch.Tensor, scales: torch.Tensor, fake: bool) -> None:
    n = x.shape[-1]
    blocks_per_row = cdiv(n, MX_BLOCK_SIZE)
    n_blocks = x.numel() // n * blocks_per_row if n else 0
    if n_blocks:
        _mxfp8(fake)(cdiv(n_blocks, MX_BLOCKS), x, out, scales, n_blocks, n, blocks_per_row)


def triton_mxfp8_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """Checked input (the dispatcher's); any last dimension (a partial last block)."""
    x = x.contiguous()
    y = torch.empty_like(x)
    _mxfp8_launch(x, y, y, fake=True)
    return y


def triton_mxfp8_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    values = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    scales = torch.empty((*x.shape[:-1], cdiv(x.shape[-1], MX_BLOCK_SIZE)), dtype=torch.uint8, device=x.device)
    _mxfp8_launch(x, values, scales, fake=False)
    return values.view(torch.float8_e4m3fn), scales


def triton_mxfp4_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """Checked input: the last dimension a multiple of 32."""
    x = x.contiguous()
    y = torch.empty_like(x)
    n_blocks = x.numel() // MX_BLOCK_SIZE
    if n_blocks:
        _mxfp4(True)(cdiv(n_blocks, MX_BLOCKS), x, y, y, n_blocks)
    return y


def triton_mxfp4_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked input: the last dimension a multiple of 32, no NaN."""
    x = x.contiguous()
    packed = torch.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=torch.uint8, device=x.device)
    scales = torch.empty((*x.shape[:-1], x.shape[-1] // MX_BLOCK_SIZE), dtype=torch.uint8, device=x.device)
    n_blocks = x.numel() // MX_BLOCK_SIZE
    if n_blocks:
        _mxfp4(False)(cdiv(n_blocks, MX_BLOCKS), x, packed, scales, n_blocks)
    return packed, scales


def _fp8_group_launch(x, out, scales, group_size: int, scale_format: str, fake: bool) -> None:
    n_groups = x.numel() // group_size
    if n_groups:
        launcher = _fp8_groups(group_size, scale_format == "ue8m0", fake)
        launcher(cdiv(n_groups, GROUP_BLOCKS), x, out, scales, n_groups, GROUP_AMAX_FLOOR)


def triton_fp8_group_fake_quant(x: torch.Tensor, group_size: int, scale_format: str) -> torch.Tensor:
    """Checked input: the last dimension a multiple of group_size, a power of two (a Triton block shape)."""
    x = x.contiguous()
    y = torch.empty_like(x)
    _fp8_group_launch(x, y, y, group_size, scale_format, fake=True)
    return y


def triton_fp8_group_quantize(x: torch.Tensor, group_size: int, scale_format: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    values = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    scales = torch.empty((*x.shape[:-1], x.shape[-1] // group_size), dtype=torch.float32, device=x.device)
    _fp8_group_launch(x, values, scales, group_size, scale_format, fake=False)
    return values.view(torch.float8_e4m3fn), scales


def triton_fp8_fake_quant(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """Checked input (the dispatcher's): a float tensor, a one-element float32 amax on its device."""
    x = x.contiguous()
    y = torch.empty_like(x)
    if x.numel():
        _fp8_tensor()(cdiv(x.numel(), FP8_TENSOR_BLOCK), x, y, amax, x.numel())
    return y
