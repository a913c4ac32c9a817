"""An independent reference of the MX formats (MXFP8, MXFP4) and of FP8 with 128x128 weight blocks and 1x128
activation groups, element by element: Python floats (exact for every value here), float32 arithmetic through
numpy float32 scalars (IEEE, correctly rounded), element values from their bit definitions and rounding by a
nearest-value search. It shares no code with dist_quant.

Sources, and what each function takes from them:
- OCP Microscaling Formats (MX) v1.0: an MX block is one E8M0 scale X (X = 2^(byte - 127), byte 0xFF = NaN) and
  32 elements P_i, standing for X * P_i (section 5); elements E4M3 (MXFP8) or E2M1 (MXFP4) (section 5.3). The
  conversion the spec suggests (section 6.3): shared_exp = floor(log2(max_i |V_i|)) - emax_elem (emax_elem = 8 for
  E4M3, whose largest normal is 1.75 x 2^8 = 448, and 2 for E2M1, 1.5 x 2^2 = 6), X = 2^shared_exp, then
  P_i = V_i / X converted to the element format, normal values past its range clamped to its largest value.
  Microsoft's emulation library written with the spec (microxcaling, mx/mx_ops.py `_quantize_mx`) clamps the
  exponent to [-127, 127] below; elements round to nearest, ties to even, here. -> `ocp_exponent`, rule "ocp".
- ModelOpt 0.47 (nvidia-modelopt, modelopt/torch/quantization/qtensor/):
  mxfp8_tensor.py, MXFP8QTensor._compute_e8m0_exponent: e = ceil(log2(amax / 448)), an amax of 0 -> -127, e
  clamped to [-127, 127]; quantize_with_scale: x * 2^-e, clamped to +-448, cast to float8_e4m3fn (nearest, ties to
  even); dequantize: value * 2^(byte - 127).
  mxfp4_tensor.py, MXFP4QTensor.quantize: e = ceil(max(log2(amax / 6), -127)); v = x / 2^e; cast_fp4: magnitude
  code = how many of the bounds 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5 that |v| exceeds (strictly), sign bit
  (2 - sign(v)) // 2, i.e. set unless v > 0; fuse_uint4_to_uint8: element 2i in the low nibble.
  -> `modelopt_exponent`, rule "modelopt". Here ceil(log2(.)) is the exact one (the quotient rounded to float32
  first); ModelOpt takes torch.log2, which can round a quotient a few ulps above 2^k to k.
- DeepSeek-V3 (inference/kernel.py): weight_dequant: value x the float32 scale of its 128x128 block, in float32;
  act_quant: per 128 consecutive elements of a row, s = amax / 448 (with scale_fmt "ue8m0", s rounded up to a
  power of two), values x / s cast to E4M3. The checkpoint's weight scale is its block's amax / 448
  (README_WEIGHTS.md), tail blocks partial. ModelOpt 0.47's export of FP8 block weights (quant_utils.py
  get_scaling_factor after TensorQuantizer.export_amax) replaces an amax of 0 by 448 and clamps it to
  [float32 tiny, float32 max]. vLLM (fp8_utils.py, per_token_group_quant_fp8): amax floored at eps = 1e-10, scale
  amax / 448, ue8m0: 2^ceil(log2(scale)), values clamp(x / scale, -448, 448) cast to E4M3.

NaN elements are left out of every amax (dist_quant's convention, docs/formats.md; ModelOpt's torch amax would
propagate them) and stay NaN where the element format has NaN.
"""

from __future__ import annotations

import bisect
import math

import numpy as np
import torch

E8M0_BIAS = 127
FLOAT32_TINY = 2.0**-126
FLOAT32_MAX = float(np.finfo(np.float32).max)
GROUP_AMAX_FLOOR = float(np.float32(1e-10))  # vLLM's eps, a float32 in its Triton kernel


def _e4m3_values() -> list[float]:
    """Positive finite E4M3 values by code 0x00..0x7E: bias 7, 3 mantissa bits, exponent field 0 subnormal."""
    values = []
    for code in range(0x7F):
        exponent, mantissa = code >> 3, code & 7
        values.append(mantissa / 8 * 2.0**-6 if exponent == 0 else (1 + mantissa / 8) * 2.0 ** (exponent - 7))
    return values


def _e2m1_values() -> list[float]:
    """E2M1 magnitudes by code 0..7: bias 1, 1 mantissa bit, exponent field 0 subnormal."""
    values = []
    for code in range(8):
        exponent, mantissa = code >> 1, code & 1
        values.append(mantissa / 2 if exponent == 0 else (1 + mantissa / 2) * 2.0 ** (exponent - 1))
    return values


E4M3_VALUES, E2M1_VALUES = _e4m3_values(), _e2m1_values()
ELEMENTS = {"e4m3": (E4M3_VALUES, 8), "e2m1": (E2M1_VALUES, 2)}  # values by code, emax_elem


def nearest_code(magnitude: float, values: list[float], ties: str) -> int:
    """Code of the value nearest `magnitude` (>= 0, may be Inf); past the largest value it saturates. Ties go to
    the even code ("even") or to the smaller value ("down")."""
    if magnitude >= values[-1]:
        return len(values) - 1
    above = bisect.bisect_left(values, magnitude)
    if values[above] == magnitude:
        return above
    below = above - 1
    to_below, to_above = magnitude - values[below], values[above] - magnitude
    if to_below != to_above:
        return below if to_below < to_above else above
    return below if ties == "down" or below % 2 == 0 else above


def f32(value: float) -> float:
    return float(np.float32(value))


def f32_divide(a: float, b: float) -> float:
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return float(np.float32(a) / np.float32(b))


def f32_multiply(a: float, b: float) -> float:
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.float32(a) * np.float32(b))


def floor_log2(a: float) -> int:
    """The largest k with 2^k <= a (a > 0, finite)."""
    k = math.floor(math.log2(a))
    while 2.0**k > a:
        k -= 1
    while 2.0 ** (k + 1) <= a:
        k += 1
    return k


def ceil_log2(a: float) -> int:
    """The smallest k with 2^k >= a (a > 0, finite)."""
    k = math.ceil(math.log2(a))
    while 2.0 ** (k - 1) >= a:
        k -= 1
    while 2.0**k < a:
        k += 1
    return k


def clamp_exponent(e: int) -> int:
    return max(-E8M0_BIAS, min(E8M0_BIAS, e))


def ocp_exponent(amax: float, element: str) -> int:
    """The OCP spec's suggested shared exponent, floor(log2(amax)) - emax_elem, clamped to the E8M0 range."""
    if amax == 0:
        return -E8M0_BIAS
    if math.isinf(amax):
        return E8M0_BIAS
    return clamp_exponent(floor_log2(amax) - ELEMENTS[element][1])


def modelopt_exponent(amax: float, element: str) -> int:
    """ModelOpt 0.47's shared exponent: ceil(log2(float32(amax / element max))), clamped to the E8M0 range."""
    ratio = f32_divide(amax, ELEMENTS[element][0][-1])
    if ratio == 0:
        return -E8M0_BIAS
    if math.isinf(ratio):
        return E8M0_BIAS
    return clamp_exponent(ceil_log2(ratio))


def _amax(values: list[float]) -> float:
    return max((abs(v) for v in values if not math.isnan(v)), default=0.0)


def _rows(x: torch.Tensor) -> list[list[float]]:
    return x.float().reshape(-1, x.shape[-1]).tolist()


def _out(rows: list[list[float]], shape, dtype) -> torch.Tensor:
    """Exact float32 values -> tensor of `shape`, rounded once to dtype."""
    return torch.tensor(rows, dtype=torch.float32).reshape(shape).to(dtype)


def mx(x: torch.Tensor, element: str, rule: str = "modelopt") -> dict:
    """MX quantization of x along its last dimension, blocks of 32 (the last one partial).
    -> dict: codes (int64 [..., n]: E4M3 bytes, NaN as 0x7F | sign; E2M1 codes with the sign in bit 3),
    scales (uint8 [..., blocks]), fake_quant (the decoded values, float32 exact, rounded once to x's dtype)."""
    values, _ = ELEMENTS[element]
    exponent_rule = {"modelopt": modelopt_exponent, "ocp": ocp_exponent}[rule]
    sign_shift = 7 if element == "e4m3" else 3
    codes, scales, decoded = [], [], []
    for row in _rows(x):
        row_codes, row_scales, row_decoded = [], [], []
        for start in range(0, len(row), 32):
            block = row[start : start + 32]
            e = exponent_rule(_amax(block), element)
            row_scales.append(e + E8M0_BIAS)
            for v in block:
                if math.isnan(v):
                    row_codes.append(0x7F if element == "e4m3" else 0)
                    row_decoded.append(math.nan)
                    continue
                scaled = f32_divide(v, 2.0**e)
                if element == "e2m1" and rule == "modelopt":
                    code, negative = nearest_code(abs(scaled), values, "down"), not scaled > 0
                else:
                    code, negative = nearest_code(abs(scaled), values, "even"), math.copysign(1, scaled) < 0
                row_codes.append(code | (negative << sign_shift))
                magnitude = f32(values[code] * 2.0**e) if values[code] * 2.0**e <= FLOAT32_MAX else math.inf
                row_decoded.append(-magnitude if negative else magnitude)
        codes.append(row_codes)
        scales.append(row_scales)
        decoded.append(row_decoded)
    return {
        "codes": torch.tensor(codes, dtype=torch.int64).reshape(x.shape),
        "scales": torch.tensor(scales, dtype=torch.uint8).reshape(*x.shape[:-1], -1),
        "fake_quant": _out(decoded, x.shape, x.dtype),
    }


def e4m3_byte(v: float) -> int:
    """float32 v clamped to +-448 and rounded to E4M3 (ties to even); NaN -> 0x7F."""
    if math.isnan(v):
        return 0x7F
    return nearest_code(abs(v), E4M3_VALUES, "even") | ((math.copysign(1, v) < 0) << 7)


def e4m3_value(byte: int) -> float:
    magnitude = E4M3_VALUES[byte & 0x7F] if byte & 0x7F != 0x7F else math.nan
    return -magnitude if byte & 0x80 else magnitude


def _scaled_e4m3(block: list[float], scale: float) -> tuple[list[int], list[float]]:
    """E4M3 bytes of float32(v / scale) and their float32 dequantization float32(value * scale)."""
    codes = [e4m3_byte(f32_divide(v, scale)) for v in block]
    return codes, [f32_multiply(e4m3_value(c), scale) for c in codes]


def fp8_weight_blocks(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> dict:
    """FP8 block-scaled weights over the last two dimensions: per block (tail blocks partial) scale =
    float32(amax / 448), amax 0 -> 448 and clamped to [2^-126, float32 max] as ModelOpt's export does.
    -> dict: codes (E4M3 bytes, int64, w's shape), scales (float32 [..., blocks down, blocks across]), fake_quant."""
    rows, columns = w.shape[-2:]
    grid = (-(-rows // block[0]), -(-columns // block[1]))
    codes = [[0] * columns for _ in range(w[..., 0, 0].numel() * rows)]
    decoded = [[0.0] * columns for _ in codes]
    scales = []
    matrices = w.float().reshape(-1, rows, columns).tolist()
    for m, matrix in enumerate(matrices):
        for i in range(grid[0]):
            for j in range(grid[1]):
                cells = [(r, c) for r in range(i * block[0], min(rows, (i + 1) * block[0]))
                         for c in range(j * block[1], min(columns, (j + 1) * block[1]))]
                amax = _amax([matrix[r][c] for r, c in cells])
                amax = min(max(448.0 if amax == 0 else amax, FLOAT32_TINY), FLOAT32_MAX)
                scale = f32_divide(amax, 448.0)
                scales.append(scale)
                block_codes, block_decoded = _scaled_e4m3([matrix[r][c] for r, c in cells], scale)
                for (r, c), code, value in zip(cells, block_codes, block_decoded):
                    codes[m * rows + r][c], decoded[m * rows + r][c] = code, value
    return {
        "codes": torch.tensor(codes, dtype=torch.int64).reshape(w.shape),
        "scales": torch.tensor(scales, dtype=torch.float32).reshape(*w.shape[:-2], *grid),
        "fake_quant": _out(decoded, w.shape, w.dtype),
    }


def fp8_token_groups(x: torch.Tensor, group: int = 128, scale_format: str = "float32") -> dict:
    """FP8 per-token groups of `group` consecutive elements of the last dimension: scale = float32(max(amax, eps)
    / 448), with "ue8m0" the smallest power of two >= it. -> dict: codes, scales ([..., n / group]), fake_quant."""
    codes, scales, decoded = [], [], []
    for row in _rows(x):
        for start in range(0, len(row), group):
            block = row[start : start + group]
            scale = f32_divide(max(_amax(block), GROUP_AMAX_FLOOR), 448.0)
            if scale_format == "ue8m0" and not math.isinf(scale):
                scale = 2.0 ** ceil_log2(scale)
            scales.append(scale)
            block_codes, block_decoded = _scaled_e4m3(block, scale)
            codes += block_codes
            decoded += block_decoded
    return {
        "codes": torch.tensor(codes, dtype=torch.int64).reshape(x.shape),
        "scales": torch.tensor(scales, dtype=torch.float32).reshape(*x.shape[:-1], -1),
        "fake_quant": _out([decoded], x.shape, x.dtype),
    }


def assert_same_codes(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bytes of a float8_e4m3fn (or uint8) tensor equal the reference codes; NaN (0x7F / 0xFF) at the same places,
    its sign aside."""
    actual = actual.view(torch.uint8).long() if actual.dtype == torch.float8_e4m3fn else actual.long()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    nan = (expected & 0x7F) == 0x7F
    assert torch.equal((actual & 0x7F) == 0x7F, nan), "NaN positions differ"
    mismatched = ((actual != expected) & ~nan).nonzero()
    assert len(mismatched) == 0, (
        f"{len(mismatched)} of {expected.numel()} codes differ; first at {mismatched[0].tolist()}: "
        f"{actual[tuple(mismatched[0])].item():#04x} != {expected[tuple(mismatched[0])].item():#04x}"
    )
