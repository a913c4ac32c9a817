"""FP8 E4M3 with block scales (docs/formats.md), DeepSeek-V3's release format: weights in 128x128 blocks with a
float32 scale each, activations in per-token groups of 128 consecutive elements with a dynamic float32 scale each
(as the engines quantize them before a block-scaled GEMM). Pure torch reference.

Weights follow ModelOpt 0.47's export (FP8 per-block weights: scale = block amax / 448, an amax of 0 read as 448,
amax clamped to [float32 tiny, float32 max]); dequantization is DeepSeek's weight_dequant (value x scale in
float32). Activations follow vLLM / SGLang's per_token_group_quant_fp8 (amax floored at 1e-10; optionally the
scale rounded up to a power of two, DeepSeek-V3.1's `scale_fmt: ue8m0`).
"""

from __future__ import annotations

import torch

from dist_quant.numerics.fp8 import E4M3_MAX, cast_e4m3, check_float_input, divide
from dist_quant.numerics.mx import E8M0_BIAS, decode_e8m0, nan_free_amax, shared_exponent

WEIGHT_BLOCK = (128, 128)
GROUP_SIZE = 128
# vLLM's and SGLang's per_token_group_quant_fp8 default eps. (DeepSeek's own act_quant floors at 1e-4.)
GROUP_AMAX_FLOOR = 1e-10
SCALE_FORMATS = ("float32", "ue8m0")


def _check_block(block: tuple[int, int]) -> None:
    if len(block) != 2 or min(block) < 1:
        raise ValueError(f"FP8 weight blocks: block must be two positive sizes (rows, columns), got {block}")


def _weight_blocks(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float32 [..., rows / br, br, columns / bc, bc], tail blocks padded with zeros (which never raise an amax)."""
    rows, columns = w.shape[-2:]
    padded = torch.nn.functional.pad(w.float(), (0, -columns % block[1], 0, -rows % block[0]))
    return padded.reshape(*w.shape[:-2], padded.shape[-2] // block[0], block[0], padded.shape[-1] // block[1], block[1])


def fp8_block_scales(w: torch.Tensor, block: tuple[int, int] = WEIGHT_BLOCK) -> torch.Tensor:
    """float32 scales [..., ceil(rows / br), ceil(columns / bc)] of a weight's blocks over its last two dimensions:
    amax / 448, NaN left out of the amax, an amax of 0 read as 448 (scale 1), the amax clamped to
    [2^-126, float32 max] (ModelOpt's TensorQuantizer.export_amax)."""
    amax = nan_free_amax(_weight_blocks(w, block), (-3, -1))
    amax = torch.where(amax == 0, E4M3_MAX, amax).clamp(torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max)
    return divide(amax, E4M3_MAX)


def _check_weight(w: torch.Tensor, block: tuple[int, int], name: str) -> None:
    _check_block(block)
    if w.dim() < 2:
        raise ValueError(f"{name} needs a weight of at least two dimensions, got shape {tuple(w.shape)}")


def _expanded(scales: torch.Tensor, rows: int, columns: int, block: tuple[int, int]) -> torch.Tensor:
    return scales.repeat_interleave(block[0], -2).repeat_interleave(block[1], -1)[..., :rows, :columns]


def fp8_block_quantize(
    w: torch.Tensor, block: tuple[int, int] = WEIGHT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (values float8_e4m3fn, w's shape; scales float32 [..., ceil(rows / br), ceil(columns / bc)]).

    values = cast_e4m3(w / scale of its block); leading dimensions (stacked experts) are kept. NaN stays NaN;
    +-Inf clamps its block's amax to float32 max and becomes +-448.
    """
    check_float_input(w)
    _check_weight(w, block, "FP8 block quantize")
    scales = fp8_block_scales(w, block)
    return cast_e4m3(w.float() / _expanded(scales, *w.shape[-2:], block)), scales


def fp8_block_dequantize(
    values: torch.Tensor,
    scales: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    block: tuple[int, int] = WEIGHT_BLOCK,
) -> torch.Tensor:
    """DeepSeek's weight_dequant: value x its block's scale in float32, then one rounding to dtype."""
    _check_weight(values, block, "FP8 block dequantize")
    rows, columns = values.shape[-2:]
    expected = (*values.shape[:-2], -(-rows // block[0]), -(-columns // block[1]))
    if values.dtype != torch.float8_e4m3fn or scales.dtype != torch.float32 or tuple(scales.shape) != expected:
        raise ValueError(
            f"FP8 block dequantize: expected float8_e4m3fn values and float32 scales of shape {expected}, "
            f"got {values.dtype} and {scales.dtype} {tuple(scales.shape)}"
        )
    return (values.float() * _expanded(scales, rows, columns, block)).to(dtype)


def fp8_block_fake_quant(w: torch.Tensor, block: tuple[int, int] = WEIGHT_BLOCK) -> torch.Tensor:
    """FP8 block quantize and dequantize, in w's dtype: the weight an engine computes with."""
    return fp8_block_dequantize(*fp8_block_quantize(w, block), dtype=w.dtype, block=block)


# ---------------------------------------------------------------------------------------------------------------
# Activations: per-token groups


def check_groups(x: torch.Tensor, group_size: int, scale_format: str, name: str) -> None:
    check_float_input(x)
    if scale_format not in SCALE_FORMATS:
        raise ValueError(f"{name}: scale_format must be one of {', '.join(SCALE_FORMATS)}, got {scale_format!r}")
    if group_size < 1 or x.dim() == 0 or x.shape[-1] % group_size:
        raise ValueError(
            f"{name} needs the last dimension to be a multiple of the group size {group_size}, "
            f"got shape {tuple(x.shape)}"
        )


def _groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    return x.float().reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def fp8_group_scales(x: torch.Tensor, group_size: int = GROUP_SIZE, scale_format: str = "float32") -> torch.Tensor:
    """float32 scales [..., n / group_size]: max(amax, 1e-10) / 448 per group (NaN left out of the amax); with
    "ue8m0" rounded up to a power of two. A group holding +-Inf gets an infinite scale (it dequantizes to NaN, as
    in vLLM)."""
    check_groups(x, group_size, scale_format, "FP8 group scales")
    amax = nan_free_amax(_groups(x, group_size), (-1,)).clamp(min=GROUP_AMAX_FLOOR)
    if scale_format == "float32":
        return divide(amax, E4M3_MAX)
    # 2^ceil(log2(amax / 448)), exactly: MX's shared exponent (its E8M0 clamp never binds above the floor)
    return torch.where(amax.isinf(), amax, decode_e8m0(shared_exponent(amax, E4M3_MAX) + E8M0_BIAS))


def fp8_group_quantize(
    x: torch.Tensor, group_size: int = GROUP_SIZE, scale_format: str = "float32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (values float8_e4m3fn, x's shape; scales float32 [..., n / group_size]); values = cast_e4m3(x / scale)."""
    scales = fp8_group_scales(x, group_size, scale_format)
    values = cast_e4m3(_groups(x, group_size) / scales.unsqueeze(-1))
    return values.reshape(x.shape), scales


def fp8_group_dequantize(
    values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32, group_size: int = GROUP_SIZE
) -> torch.Tensor:
    """value x its group's scale in float32, then one rounding to dtype."""
    expected = (*values.shape[:-1], values.shape[-1] // group_size) if values.dim() else None
    if (values.dtype != torch.float8_e4m3fn or scales.dtype != torch.float32 or expected is None
            or values.shape[-1] % group_size or tuple(scales.shape) != expected):
        raise ValueError(
            f"FP8 group dequantize: expected float8_e4m3fn values [..., a multiple of {group_size}] and float32 scales "
            f"{expected}, got {values.dtype} {tuple(values.shape)} and {scales.dtype} {tuple(scales.shape)}"
        )
    y = _groups(values, group_size) * scales.unsqueeze(-1)
    return y.reshape(values.shape).to(dtype)


def fp8_group_fake_quant(x: torch.Tensor, group_size: int = GROUP_SIZE, scale_format: str = "float32") -> torch.Tensor:
    """FP8 per-token-group quantize and dequantize, in x's dtype."""
    return fp8_group_dequantize(*fp8_group_quantize(x, group_size, scale_format), dtype=x.dtype, group_size=group_size)
