"""NVFP4: E2M1 values in blocks of 16 along the last dim, an E4M3 scale per block under a float32 per-tensor
scale_2 = global amax / 2688 (docs/formats.md, "NVFP4"); fused siblings share the global amax."""

from __future__ import annotations

from typing import Sequence

import torch

from dist_quant import kernels
from dist_quant.formats.base import DYNAMIC, SCALAR, STATIC, NumberFormat, QuantFormat, Spec, calibrated_top_warning
from dist_quant.numerics.fp8 import E4M3_MAX, nonzero_amax
from dist_quant.numerics.nvfp4 import BLOCK_SIZE, E2M1_MAX, SCALE_2_DIVISOR, nvfp4_block_amax


class NVFP4Format(NumberFormat):
    name = "nvfp4"
    algo = "NVFP4"  # its name in checkpoint configs (quant_algo, kv_cache_quant_algo)
    config_bits = 4  # num_bits in config groups
    config_entries = {"group_size": BLOCK_SIZE}  # what its layers' configs add (hf_quant_config's quantization, quantized_layers, groups)
    weight_dtype = torch.uint8  # its weights' dtype in the checkpoint
    spellings = ("e2m1", 4)
    block = BLOCK_SIZE
    global_scale = True
    weight_bytes = 0.5 + 1 / BLOCK_SIZE  # two values a byte, an E4M3 scale a block
    scale_divisor = SCALE_2_DIVISOR
    largest = E4M3_MAX  # a cast's amax, as for FP8 (the KV cache's constant 448)
    segmented = True

    def problem(self, fmt: QuantFormat) -> str | None:
        if fmt.axis is not None or fmt.block_type not in (DYNAMIC, STATIC) or fmt.block_shape is not None:
            return "NVFP4 needs block_type dynamic or static and no axis"
        return None

    def selects(self, num_bits, blocks: dict | None) -> bool:
        return num_bits in self.spellings and (blocks or {}).get("scale_bits") != "e8m0"

    def parse(self, reader, cfg: dict, where: str) -> QuantFormat:
        if cfg.get("axis") is not None:
            raise reader.fail(f"{where}.axis", "e2m1 is block-scaled along the last dimension; axis must be null")
        blocks = cfg.get("block_sizes")
        if blocks is None:
            raise reader.fail(where, f"e2m1 needs block_sizes {{-1: {BLOCK_SIZE}, type: dynamic|static, scale_bits: e4m3}}")
        blocks = reader.mapping(blocks, f"{where}.block_sizes", (-1, "type", "scale_bits"), (-1,))
        if blocks[-1] != BLOCK_SIZE or isinstance(blocks[-1], bool):
            raise reader.fail(f"{where}.block_sizes", f"block size must be {BLOCK_SIZE} for e2m1, got {blocks[-1]!r}")
        block_type = reader.choice(blocks.get("type", DYNAMIC), (DYNAMIC, STATIC), f"{where}.block_sizes.type")
        reader.choice(blocks.get("scale_bits", "e4m3"), ("e4m3",), f"{where}.block_sizes.scale_bits")
        constant = cfg.get("use_constant_amax", False)
        if constant and block_type == STATIC:
            raise reader.fail(where, "use_constant_amax needs dynamic blocks: a constant amax has no per-block values")
        return QuantFormat(self.name, block_type=block_type, use_constant_amax=constant)

    def describe(self, fmt: QuantFormat) -> str:
        return f"{self.name} block{BLOCK_SIZE}" + (" static" if fmt.block_type == STATIC else "")

    def block_amax(self, x):
        return nvfp4_block_amax(x)

    def buffer_shapes(self, fmt: QuantFormat, weight: torch.Tensor | None) -> dict[str, torch.Size]:
        shapes = {"_amax": torch.Size([]), "_global_amax": torch.Size([])}
        if fmt.block_type == STATIC and weight is not None:
            shapes["_block_amax"] = torch.Size([*weight.shape[:-1], weight.shape[-1] // BLOCK_SIZE])
        return shapes

    def fake_quant(self, fmt, x, amax, global_amax, block_amax):
        return kernels.nvfp4_fake_quant(x, amax if global_amax is None else global_amax, block_amax)

    def fake_quant_segments(self, x, global_amax, rows: Sequence[int], block_amax, row_ends=None):
        return kernels.nvfp4_fake_quant_segments(x, global_amax, rows, block_amax, row_ends)

    def clamp_bound(self, amax, global_amax):
        return nonzero_amax(amax if global_amax is None else global_amax)

    def weight_tensors(self, module: str, shape: tuple[int, int]) -> dict[str, Spec]:
        out, features = shape
        return {
            f"{module}.weight": Spec((out, features // 2), (self.weight_dtype,), "weight"),
            f"{module}.weight_scale": Spec((out, features // BLOCK_SIZE), (torch.float8_e4m3fn,), "block"),
            f"{module}.weight_scale_2": SCALAR,
        }

    def quantize_weights(self, x, amax, rows: Sequence[int], block_amax):
        packed, block_scale, scale_2 = kernels.nvfp4_quantize_segments(x, amax, rows, block_amax)
        dequantized = kernels.nvfp4_dequantize(packed, block_scale, scale_2, x.dtype, rows)
        checks = [
            ("NaN in the weights (NVFP4 cannot encode it)", torch.isnan(x).any()),
            ("the exported weights do not dequantize to the fake-quant weights",
             (dequantized != kernels.nvfp4_fake_quant_segments(x, amax, rows, block_amax)).any()),
        ]
        return (packed.split(rows), block_scale.split(rows), scale_2.unbind(0)), checks

    def weight_checkpoint(self, module, values, blocks, scale):
        return [(f"{module}.weight", values), (f"{module}.weight_scale", blocks), (f"{module}.weight_scale_2", scale)]

    def check_values(self, module, tensors):
        blocks, scale_2 = tensors.get(f"{module}.weight_scale"), tensors.get(f"{module}.weight_scale_2")
        if blocks is None or not blocks.numel():
            return [], None
        # codes below 0x80 are the non-negative ones, growing with their values; 0x00 is zero, 0x7F NaN: scales
        # whose extremes are in 0x01..0x7E are sound, the others are looked at closely
        codes = blocks.view(torch.uint8)
        largest, smallest = codes.max(), codes.min()
        if largest >= 0x7F or smallest == 0:
            if ((codes & 0x7F) == 0x7F).any():
                return [f"{module}.weight_scale holds NaN bytes"], None
            return [f"{module}.weight_scale holds zero or negative scales"], None
        largest = largest.view(torch.float8_e4m3fn).float()
        # E2M1 values are at most 6 in size: the largest block scale decides finiteness without the weight
        if scale_2 is not None and not torch.isfinite(E2M1_MAX * largest * scale_2):
            return [f"{module} dequantizes to non-finite values"], largest.item()
        return [], largest.item()

    def top_warning(self, where, tops):
        return calibrated_top_warning(where, max(tops), "block scale", "weight_scale_2", "amax / 2688 (= amax / 6 / 448)")
