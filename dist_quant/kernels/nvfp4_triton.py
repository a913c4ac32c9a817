"""Triton NVFP4 kernels, bit-identical to `dist_quant.numerics.nvfp4`.

The input is viewed as a flat run of 16-element blocks; one program handles `BLOCKS` of them. Every rounding
is float32 arithmetic that is exact by construction, with no reliance on the backend's FP8 conversion:
- E4M3 block scale: mantissa bit rounding for normals, `(s + 2^14) - 2^14` for subnormals (the float32 ulp of
  2^14 is 2^-9, the E4M3 subnormal step).
- Divisions (x / scale, block amax / (6 scale_2)): the spec divides, and a reciprocal multiply can differ near
  tie points. A correctly rounded reciprocal (once per block or per program) plus one FMA residual step
  (Markstein) gives the correctly rounded quotient, far cheaper than a full division per element.
- E2M1: `(a + C) - C` with C = 2^22, 2^23, 2^24 in [0, 2), [2, 4), [4, 8): the float32 ulp of C is the E2M1
  step there (0.5, 1, 2), and float addition rounds ties to even, which is the even E2M1 code.
- Signs multiply (`0 - m` would turn -0.0 into +0.0): a negative x that rounds to 0 gives -0.0, as in the spec.
  The sign is that of x / scale, as in the reference: it differs from x's only where the quotient underflows.
Under TRITON_INTERPRET=1 (the INTERPRETED flag), bfloat16 is converted through its bits, because the interpreter
truncates and mangles bf16 subnormals, and NaN is masked out of the block max, because the interpreter's max
propagates it; on a GPU the hardware conversions round to nearest-even and max ignores NaN.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dist_quant.kernels.launch import INTERPRETED, Launcher, cdiv, next_power_of_2
from dist_quant.numerics.nvfp4 import BLOCK_SIZE, nvfp4_scale_2, nvfp4_scales_2

# Blocks per program and warps, from the launch sweep of benchmarks/bench_numerics.py on an H200.
FAKE_QUANT_BLOCKS = 128
FAKE_QUANT_WARPS = 4
QUANTIZE_BLOCKS = 128


@triton.jit
def _load_f32(ptr, offs, mask, INTERPRETED: tl.constexpr):
    if INTERPRETED and ptr.dtype.element_ty == tl.bfloat16:
        raw = tl.load(ptr.to(tl.pointer_type(tl.int16)) + offs, mask=mask, other=0)
        return (raw.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_from_f32(ptr, offs, y, mask, INTERPRETED: tl.constexpr):
    if INTERPRETED and ptr.dtype.element_ty == tl.bfloat16:
        bits = y.to(tl.int32, bitcast=True)
        bits = tl.where(y == y, bits + 0x7FFF + ((bits >> 16) & 1), bits | 0x400000)  # NaN stays NaN
        tl.store(ptr.to(tl.pointer_type(tl.int16)) + offs, (bits >> 16).to(tl.int16), mask=mask)
    else:
        tl.store(ptr + offs, y.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_2(global_amax):
    g = tl.where(global_amax == 0.0, 1.0, global_amax)
    return tl.div_rn(g, 2688.0)


@triton.jit
def _program_blocks(n_blocks, BLOCKS: tl.constexpr):
    """-> (first block of the program in its part, its blocks, which of them exist, its part). The grid's second
    axis counts parts: equal segments of n_blocks blocks each (an MoE role's expert weights), each with its own
    global amax at [part], laid out one after the other and launched as if each were a tensor of its own. One
    part (everything else) is the whole tensor, part 0."""
    part = tl.program_id(1)
    first = tl.program_id(0).to(tl.int64) * BLOCKS
    local = first + tl.arange(0, BLOCKS)
    return first, part.to(tl.int64) * n_blocks + local, local < n_blocks, part


@triton.jit
def _segments_ending_by(rows, row_ends_ptr, n_segments):
    """How many segments end at or before each row: the segment of each row (segment s holds rows
    [row_ends[s - 1], row_ends[s]); empty segments are passed over). A binary search, log2(segments) loads."""
    step = 1
    while step < n_segments:
        step *= 2
    count = rows * 0
    while step > 0:
        probe = count + step
        inside = probe <= n_segments
        end = tl.load(row_ends_ptr + probe - 1, mask=inside, other=0)
        count = tl.where(inside & (end <= rows), probe, count)
        step //= 2
    return count


@triton.jit
def _program_segment(first, n_blocks, blocks_per_row, row_ends_ptr, n_segments, BLOCKS: tl.constexpr,
                     SEGMENTS: tl.constexpr):
    """The segment of a program's blocks [first, first + BLOCKS) where they all lie in one (the rule for
    segments of whole weights or of a hundred tokens: -1 only where a segment ends inside the program), from one
    load of all segment ends."""
    ends = tl.load(row_ends_ptr + tl.arange(0, SEGMENTS), mask=tl.arange(0, SEGMENTS) < n_segments, other=2**31 - 1)
    last = tl.minimum(first + BLOCKS, n_blocks) - 1
    segment = tl.sum((ends <= first // blocks_per_row).to(tl.int32), axis=0)
    same = segment == tl.sum((ends <= last // blocks_per_row).to(tl.int32), axis=0)
    return tl.where(same, segment, -1)


@triton.jit
def _block_amax(x, INTERPRETED: tl.constexpr):
    """Max |x| per block, NaN ignored (the GPU's max does that by itself; the interpreter's propagates NaN)."""
    if INTERPRETED:
        x = tl.where(x == x, x, 0.0)
    return tl.max(tl.abs(x), axis=1)


@triton.jit
def _quotient(a, b, b_inverse, smallest_scale_2):
    """a / b, correctly rounded, from b_inverse = RN(1 / b): one FMA residual step (Markstein's theorem). Where
    the first product is already infinite (a = +-Inf, or a quotient past float32) or NaN, it is kept: the
    residual would be NaN or Inf. Below scale_2 = 2^-90 the residual could underflow, so programs with such
    (absurdly small) scale_2 divide instead; both give the correctly rounded quotient, and the branch on the
    smallest scale_2 of the program is uniform over it."""
    if smallest_scale_2 < 8.077935669463161e-28:
        q = tl.div_rn(a, b)
    else:
        q = a * b_inverse
        residual = tl.fma(-b, q, a)
        q = tl.fma(tl.where(tl.abs(q) < float("inf"), residual, 0.0), b_inverse, q)
    return q


@triton.jit
def _e4m3_block_scale(block_amax, scale_2, smallest_scale_2):
    """Float32 value of the clamped E4M3 block scale (exactly representable in E4M3)."""
    divisor = 6.0 * scale_2
    s = _quotient(block_amax, divisor, tl.div_rn(1.0, divisor), smallest_scale_2)
    s = tl.where(s == 0.0, 1.0, s)
    s = tl.minimum(tl.maximum(s, 0.001953125), 448.0)
    bits = s.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
    subnormal = (s + 16384.0) - 16384.0
    return tl.where(s < 0.015625, subnormal, normal)


@triton.jit
def _e2m1_round(x, scale, inverse, smallest_scale_2):
    """-> (nearest E2M1 magnitude of x / scale, ties to the even code, saturating at 6; whether x / scale < 0).
    NaN gives NaN, +-Inf saturates. Nothing here keeps x alive past the quotient: registers, hence occupancy."""
    q = _quotient(x, scale, inverse, smallest_scale_2)
    a = tl.abs(q)
    c = tl.where(a < 2.0, 4194304.0, tl.where(a < 4.0, 8388608.0, 16777216.0))
    return tl.minimum((a + c) - c, 6.0, propagate_nan=tl.PropagateNan.ALL), q < 0.0


@triton.jit
def _block_scales(amax, global_amax, SEGMENTED: tl.constexpr):
    """-> (E4M3 block scale as float32 [B], scale_2 (a scalar, or [B, 1] if SEGMENTED), full scale [B, 1], its
    reciprocal [B, 1], the program's smallest scale_2)."""
    scale_2 = _scale_2(global_amax)
    if SEGMENTED:
        smallest_scale_2 = tl.min(scale_2, axis=0)
    else:
        smallest_scale_2 = scale_2
    e4m3_scale = _e4m3_block_scale(amax, scale_2, smallest_scale_2)
    scale = (e4m3_scale * scale_2)[:, None]
    if SEGMENTED:
        scale_2 = scale_2[:, None]
    return e4m3_scale, scale_2, scale, tl.div_rn(1.0, scale), smallest_scale_2


@triton.jit
def _fake_quant_blocks(x, amax, y_ptr, offs, mask, global_amax, SEGMENTED: tl.constexpr, INTERPRETED: tl.constexpr):
    """Loaded blocks x [B, 16] with their block amax fake-quantized into y; `global_amax` a scalar, or with
    SEGMENTED one per block."""
    e4m3_scale, scale_2, scale, inverse, smallest_scale_2 = _block_scales(amax, global_amax, SEGMENTED)
    magnitude, negative = _e2m1_round(x, scale, inverse, smallest_scale_2)
    # value x e4m3 scale is exact; the single rounding happens at scale_2, as in the reference.
    y = (magnitude * tl.where(negative, -e4m3_scale[:, None], e4m3_scale[:, None])) * scale_2
    _store_from_f32(y_ptr, offs, y, mask, INTERPRETED)


@triton.jit
def _nvfp4_fake_quant_kernel(
    x_ptr, y_ptr, global_amax_ptr, block_amax_ptr, row_ends_ptr, n_blocks, blocks_per_row, n_segments,
    STATIC: tl.constexpr, SEGMENTED: tl.constexpr, SEGMENTS: tl.constexpr, BLOCKS: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    first, rows, row_ok, part = _program_blocks(n_blocks, BLOCKS)
    offs = rows[:, None] * 16 + tl.arange(0, 16)[None, :]
    # the data first: its load is in flight while the segment is looked up
    x = _load_f32(x_ptr, offs, row_ok[:, None], INTERPRETED)
    if STATIC:
        amax = tl.load(block_amax_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    else:
        amax = _block_amax(x, INTERPRETED)
    if SEGMENTED:
        segment = _program_segment(first, n_blocks, blocks_per_row, row_ends_ptr, n_segments, BLOCKS, SEGMENTS)
        # (each branch names its own values: the compiler wants a name to have one type in both)
        if segment >= 0:  # one segment: its global amax a scalar, as without segments
            scalar_amax = tl.load(global_amax_ptr + segment).to(tl.float32)
            _fake_quant_blocks(x, amax, y_ptr, offs, row_ok[:, None], scalar_amax, False, INTERPRETED)
        else:
            segments = _segments_ending_by(rows // blocks_per_row, row_ends_ptr, n_segments)
            block_amaxes = tl.load(global_amax_ptr + segments).to(tl.float32)
            _fake_quant_blocks(x, amax, y_ptr, offs, row_ok[:, None], block_amaxes, True, INTERPRETED)
    else:
        global_amax = tl.load(global_amax_ptr + part).to(tl.float32)
        _fake_quant_blocks(x, amax, y_ptr, offs, row_ok[:, None], global_amax, False, INTERPRETED)


@triton.jit
def _e2m1_code(x, scale, inverse, smallest_scale_2):
    m, negative = _e2m1_round(x, scale, inverse, smallest_scale_2)
    code = tl.where(m < 2.0, m * 2.0, tl.where(m < 4.0, m + 2.0, m * 0.5 + 4.0)).to(tl.int32)
    return tl.where(negative, code | 8, code)


@triton.jit
def _quantize_blocks(even, odd, amax, packed_ptr, scale_ptr, rows, row_ok, global_amax, SEGMENTED: tl.constexpr):
    """Loaded blocks (their even and odd elements, [B, 8] each) with their block amax encoded into packed codes
    and E4M3 scale bytes; `global_amax` as in fake quant."""
    pairs = tl.arange(0, 8)[None, :]
    e4m3_scale, _, scale, inverse, smallest_scale_2 = _block_scales(amax, global_amax, SEGMENTED)
    packed = _e2m1_code(even, scale, inverse, smallest_scale_2) | (_e2m1_code(odd, scale, inverse, smallest_scale_2) << 4)
    tl.store(packed_ptr + rows[:, None] * 8 + pairs, packed.to(tl.uint8), mask=row_ok[:, None])
    # E4M3 bits of the (exactly representable) scale: biased exponent 7, 3 mantissa bits, subnormal step 2^-9.
    bits = e4m3_scale.to(tl.int32, bitcast=True)
    normal_code = (((bits >> 23) - 120) << 3) | ((bits >> 20) & 7)
    subnormal_code = (e4m3_scale * 512.0).to(tl.int32)
    code = tl.where(e4m3_scale >= 0.015625, normal_code, subnormal_code)
    tl.store(scale_ptr + rows, code.to(tl.uint8), mask=row_ok)


@triton.jit
def _nvfp4_quantize_kernel(
    x_ptr, packed_ptr, scale_ptr, global_amax_ptr, block_amax_ptr, row_ends_ptr, n_blocks, blocks_per_row,
    n_segments, STATIC: tl.constexpr, SEGMENTED: tl.constexpr, SEGMENTS: tl.constexpr, BLOCKS: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    first, rows, row_ok, part = _program_blocks(n_blocks, BLOCKS)
    even_offs = rows[:, None] * 16 + 2 * tl.arange(0, 8)[None, :]
    even = _load_f32(x_ptr, even_offs, row_ok[:, None], INTERPRETED)  # the data first, as in fake quant
    odd = _load_f32(x_ptr, even_offs + 1, row_ok[:, None], INTERPRETED)
    if STATIC:
        amax = tl.load(block_amax_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    else:
        amax = tl.maximum(_block_amax(even, INTERPRETED), _block_amax(odd, INTERPRETED))
    if SEGMENTED:
        segment = _program_segment(first, n_blocks, blocks_per_row, row_ends_ptr, n_segments, BLOCKS, SEGMENTS)
        if segment >= 0:  # as in fake quant
            scalar_amax = tl.load(global_amax_ptr + segment).to(tl.float32)
            _quantize_blocks(even, odd, amax, packed_ptr, scale_ptr, rows, row_ok, scalar_amax, False)
        else:
            segments = _segments_ending_by(rows // blocks_per_row, row_ends_ptr, n_segments)
            block_amaxes = tl.load(global_amax_ptr + segments).to(tl.float32)
            _quantize_blocks(even, odd, amax, packed_ptr, scale_ptr, rows, row_ok, block_amaxes, True)
    else:
        global_amax = tl.load(global_amax_ptr + part).to(tl.float32)
        _quantize_blocks(even, odd, amax, packed_ptr, scale_ptr, rows, row_ok, global_amax, False)


@triton.jit
def _nvfp4_dequantize_kernel(
    packed_ptr, scale_ptr, scale_2_ptr, y_ptr, row_ends_ptr, n_blocks, blocks_per_row, n_segments,
    SEGMENTED: tl.constexpr, BLOCKS: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """Codes times the E4M3 block scale (exact in float32), then times scale_2: the one rounding, as in the
    reference. Decoded from the bits, without the backend's FP8 conversion."""
    _, rows, row_ok, part = _program_blocks(n_blocks, BLOCKS)
    pairs = tl.arange(0, 8)[None, :]
    packed = tl.load(packed_ptr + rows[:, None] * 8 + pairs, mask=row_ok[:, None], other=0).to(tl.int32)
    bits = tl.load(scale_ptr + rows, mask=row_ok, other=0).to(tl.int32)
    exponent, mantissa = (bits >> 3) & 15, bits & 7
    normal = (((exponent + 120) << 23) | (mantissa << 20)).to(tl.float32, bitcast=True)
    block_scale = tl.where(exponent == 0, mantissa.to(tl.float32) * 0.001953125, normal)[:, None]
    if SEGMENTED:  # looked up as the global amax is
        scale_2 = tl.load(scale_2_ptr + _segments_ending_by(rows // blocks_per_row, row_ends_ptr, n_segments))[:, None]
    else:
        scale_2 = tl.load(scale_2_ptr + part)
    offs = rows[:, None] * 16 + 2 * pairs
    for nibble in tl.static_range(2):
        code = (packed >> (4 * nibble)) & 15
        # the sign rides on the (never zero) block scale, as in fake quant: code 8 gives -0.0
        signed_scale = tl.where((code & 8) != 0, -block_scale, block_scale)
        y = (_e2m1_magnitude(code & 7) * signed_scale) * scale_2
        _store_from_f32(y_ptr, offs + nibble, y, row_ok[:, None], INTERPRETED)


@triton.jit
def _e2m1_magnitude(m):
    """The magnitude of a 3-bit E2M1 code: 0, 0.5, 1, 1.5 (m < 4), 2, 3 (m - 2), 4, 6 (2m - 8)."""
    m = m.to(tl.float32)
    return tl.where(m < 4.0, m * 0.5, tl.where(m < 6.0, m - 2.0, m * 2.0 - 8.0))


def _launch_args(x: torch.Tensor, global_amax: torch.Tensor, block_amax: torch.Tensor | None):
    """The launch takes addresses: every tensor is made contiguous on x's device here."""
    x = x.contiguous()
    n_blocks = x.numel() // BLOCK_SIZE
    if global_amax.device != x.device:
        raise ValueError(f"NVFP4 global_amax is on {global_amax.device}, the input on {x.device}")
    block_amax_arg = global_amax if block_amax is None else block_amax.to(x.device).contiguous()
    return x, n_blocks, block_amax is not None, block_amax_arg


def _segments_arg(row_ends: torch.Tensor | None, fallback: torch.Tensor, blocks_per_row: int) -> tuple:
    """-> (the row ends or a placeholder, number of segments, its next power of two: SEGMENTS, blocks per row).
    Without segments every integer is 1: Triton compiles a kernel per class of integer arguments (1, multiples of
    16, others), and these would make classes of values the kernel never reads."""
    if row_ends is None:
        return fallback, 1, 1, 1
    return row_ends, row_ends.numel(), next_power_of_2(row_ends.numel()), blocks_per_row


# Launchers by constexprs, looked up per call, so that the launch sweeps of the benchmarks, which set the module
# constants, take effect.
@functools.cache
def _fake_quant(static: bool, segmented: bool, segments: int, blocks: int, warps: int) -> Launcher:
    constexprs = {"STATIC": static, "SEGMENTED": segmented, "SEGMENTS": segments, "BLOCKS": blocks,
                  "INTERPRETED": INTERPRETED}
    return Launcher(_nvfp4_fake_quant_kernel, constexprs, num_warps=warps)


@functools.cache
def _quantize(static: bool, segmented: bool, segments: int, blocks: int) -> Launcher:
    constexprs = {"STATIC": static, "SEGMENTED": segmented, "SEGMENTS": segments, "BLOCKS": blocks,
                  "INTERPRETED": INTERPRETED}
    return Launcher(_nvfp4_quantize_kernel, constexprs)


@functools.cache
def _dequantize(segmented: bool, blocks: int) -> Launcher:
    return Launcher(_nvfp4_dequantize_kernel, {"SEGMENTED": segmented, "BLOCKS": blocks, "INTERPRETED": INTERPRETED})


# The most parts one launch takes: the CUDA limit on the grid's second axis.
MAX_PARTS = 65535


def _grid(n_blocks: int, parts: int, blocks: int) -> tuple[int, int]:
    """The launch grid of `_program_blocks` for n_blocks blocks in `parts` equal parts."""
    return cdiv(n_blocks // parts, blocks), parts


def triton_nvfp4_fake_quant(
    x: torch.Tensor,
    global_amax: torch.Tensor,
    block_amax: torch.Tensor | None = None,
    row_ends: torch.Tensor | None = None,
    parts: int = 1,
) -> torch.Tensor:
    """`row_ends` (int32, on x's device; x 2-D): where each segment of rows ends (cumulative row counts); segment
    s has global amax `global_amax[s]`. `parts` (<= MAX_PARTS; without row_ends): x is that many equal segments,
    part p with global amax `global_amax[p]`. Neither: one segment, a scalar global amax."""
    x, n_blocks, static, block_amax_arg = _launch_args(x, global_amax, block_amax)
    y = torch.empty_like(x)
    ends_arg, n_segments, segments, blocks_per_row = _segments_arg(row_ends, global_amax, x.shape[-1] // BLOCK_SIZE)
    _fake_quant(static, row_ends is not None, segments, FAKE_QUANT_BLOCKS, FAKE_QUANT_WARPS)(
        _grid(n_blocks, parts, FAKE_QUANT_BLOCKS), x, y, global_amax, block_amax_arg, ends_arg, n_blocks // parts,
        blocks_per_row, n_segments,
    )
    return y


def triton_nvfp4_quantize(
    x: torch.Tensor,
    global_amax: torch.Tensor,
    block_amax: torch.Tensor | None = None,
    row_ends: torch.Tensor | None = None,
    parts: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (packed, block scales, scale_2: a scalar, or one per segment); `row_ends` and `parts` as for fake
    quant."""
    x, n_blocks, static, block_amax_arg = _launch_args(x, global_amax, block_amax)
    packed = torch.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=torch.uint8, device=x.device)
    scale = torch.empty((*x.shape[:-1], x.shape[-1] // BLOCK_SIZE), dtype=torch.uint8, device=x.device)
    ends_arg, n_segments, segments, blocks_per_row = _segments_arg(row_ends, global_amax, x.shape[-1] // BLOCK_SIZE)
    _quantize(static, row_ends is not None, segments, QUANTIZE_BLOCKS)(
        _grid(n_blocks, parts, QUANTIZE_BLOCKS), x, packed, scale, global_amax, block_amax_arg, ends_arg,
        n_blocks // parts, blocks_per_row, n_segments,
    )
    segmented = row_ends is not None or parts > 1
    scale_2 = nvfp4_scales_2(global_amax) if segmented else nvfp4_scale_2(global_amax)
    return packed, scale.view(torch.float8_e4m3fn), scale_2


def triton_nvfp4_dequantize(
    packed: torch.Tensor,
    block_scale: torch.Tensor,
    scale_2: torch.Tensor,
    dtype: torch.dtype,
    row_ends: torch.Tensor | None = None,
    parts: int = 1,
) -> torch.Tensor:
    """Checked arguments (the dispatcher's), contiguous, on one device. `scale_2` one per segment if segmented
    (`row_ends` or `parts`, as for fake quant)."""
    y = torch.empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=dtype, device=packed.device)
    n_blocks = block_scale.numel()
    ends_arg, n_segments, _, blocks_per_row = _segments_arg(row_ends, scale_2, block_scale.shape[-1])
    _dequantize(row_ends is not None, QUANTIZE_BLOCKS)(
        _grid(n_blocks, parts, QUANTIZE_BLOCKS), packed, block_scale.view(torch.uint8), scale_2, y, ends_arg,
        n_blocks // parts, blocks_per_row, n_segments,
    )
    return y
