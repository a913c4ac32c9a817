"""Pure torch reference numerics: no modules, no distributed. `dist_quant.kernels` dispatches to Triton."""

from dist_quant.numerics.fp8 import E4M3_MAX, cast_e4m3, fp8_fake_quant, fp8_quantize, fp8_scale
from dist_quant.numerics.mse import fp8_scale_candidates, nvfp4_mse_block_amax
from dist_quant.numerics.nvfp4 import (
    BLOCK_SIZE,
    nvfp4_block_amax,
    nvfp4_dequantize,
    nvfp4_fake_quant,
    nvfp4_fake_quant_segments,
    nvfp4_quantize,
    nvfp4_scale_2,
)
from dist_quant.numerics.mx import (
    mxfp4_dequantize,
    mxfp4_fake_quant,
    mxfp4_quantize,
    mxfp8_dequantize,
    mxfp8_fake_quant,
    mxfp8_quantize,
)
from dist_quant.numerics.fp8_blocks import (
    fp8_block_dequantize,
    fp8_block_fake_quant,
    fp8_block_quantize,
    fp8_group_dequantize,
    fp8_group_fake_quant,
    fp8_group_quantize,
)

__all__ = [
    "BLOCK_SIZE",
    "E4M3_MAX",
    "cast_e4m3",
    "fp8_fake_quant",
    "fp8_quantize",
    "fp8_scale",
    "fp8_scale_candidates",
    "nvfp4_block_amax",
    "nvfp4_dequantize",
    "nvfp4_fake_quant",
    "nvfp4_fake_quant_segments",
    "nvfp4_mse_block_amax",
    "nvfp4_quantize",
    "nvfp4_scale_2",
    "mxfp4_dequantize",
    "mxfp4_fake_quant",
    "mxfp4_quantize",
    "mxfp8_dequantize",
    "mxfp8_fake_quant",
    "mxfp8_quantize",
    "fp8_block_dequantize",
    "fp8_block_fake_quant",
    "fp8_block_quantize",
    "fp8_group_dequantize",
    "fp8_group_fake_quant",
    "fp8_group_quantize",
]
