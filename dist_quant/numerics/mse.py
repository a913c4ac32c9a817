"""MSE calibration of NVFP4 block scales by a sweep over the FP8 scale candidates (docs/formats.md).

For each 16-element block, every positive finite E4M3 value E (126 of them) is tried as the block scale, i.e.
block_amax = c * global_amax with c = E / 448. The block is quantized exactly as fake quantization would
(x / (E * scale_2), rounded to E2M1, dequantized as (q * E) * scale_2), and the candidate with the smallest sum
of squared errors wins, the lowest c on ties. The sum runs as a fixed pairwise tree, (e0 + e1) + (e2 + e3) ...,
so a kernel can reproduce it bit for bit. Signs cancel out of the error: the sweep works on |w|.
"""

from __future__ import annotations

import torch

from dist_quant.numerics.fp8 import E4M3_MAX, as_amax, divide, nonzero_amax
from dist_quant.numerics.nvfp4 import (
    BLOCK_SIZE,
    E2M1_DECODE,
    check_nvfp4_args,
    nvfp4_scale_2,
    round_to_e2m1_code,
    to_blocks,
)

# Blocks per step of the reference: bounds its temporary [blocks, 126, 16] float32 buffers to ~130 MB.
_CHUNK_BLOCKS = 16384


def fp8_scale_candidates(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 126 positive finite E4M3 values, ascending (codes 0x01..0x7E), float32."""
    return torch.arange(1, 127, dtype=torch.uint8, device=device).view(torch.float8_e4m3fn).float()


def pairwise_block_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim (16) as a fixed tree of pairwise additions."""
    while x.shape[-1] > 1:
        x = x[..., 0::2] + x[..., 1::2]
    return x[..., 0]


def check_mse_args(w: torch.Tensor, global_amax: torch.Tensor) -> None:
    check_nvfp4_args(w, global_amax, None)
    if not torch.isfinite(w).all():
        raise ValueError("NVFP4 MSE sweep: the weight holds NaN or Inf")


def nvfp4_mse_block_amax(w: torch.Tensor, global_amax: torch.Tensor | float) -> torch.Tensor:
    """-> the best per-block amax [..., n/16], float32, for static NVFP4 blocks under `global_amax`."""
    global_amax = as_amax(global_amax, w)
    check_mse_args(w, global_amax)
    scale_2 = nvfp4_scale_2(global_amax)
    candidates = fp8_scale_candidates(w.device)
    scales = candidates * scale_2
    magnitudes = to_blocks(w).abs().reshape(-1, BLOCK_SIZE)
    decode = E2M1_DECODE.to(w.device)
    best = torch.empty(magnitudes.shape[0], dtype=torch.long, device=w.device)
    for start in range(0, magnitudes.shape[0], _CHUNK_BLOCKS):
        a = magnitudes[start : start + _CHUNK_BLOCKS, None, :]
        q = decode[round_to_e2m1_code(a / scales[None, :, None]).long()]
        error = a - q * candidates[None, :, None] * scale_2
        best[start : start + _CHUNK_BLOCKS] = pairwise_block_sum(error * error).argmin(dim=1)
    block_amax = divide(candidates, E4M3_MAX)[best] * nonzero_amax(global_amax)
    return block_amax.reshape(*w.shape[:-1], w.shape[-1] // BLOCK_SIZE)
