"""FP8 E4M3 with one scale per tensor or per channel (docs/formats.md, "FP8"): scale = amax / 448."""

from __future__ import annotations

from typing import Sequence

import torch

from dist_quant.formats.base import SCALAR, NumberFormat, QuantFormat, Spec, calibrated_top_warning, e4m3_block_largest
from dist_quant.kernels.block_formats import fp8_fake_quant
from dist_quant.numerics.fp8 import E4M3_MAX, cast_e4m3, fp8_scale, nonzero_amax


class FP8Format(NumberFormat):
    name = "fp8"
    algo = "FP8"  # its name in checkpoint configs (quant_algo, kv_cache_quant_algo)
    config_bits = 8  # num_bits in config groups
    config_entries = {}  # what its layers' configs add (hf_quant_config's quantization, quantized_layers, groups)
    weight_dtype = torch.float8_e4m3fn  # its weights' dtype in the checkpoint
    spellings = ("e4m3", 8)
    scale_divisor = E4M3_MAX
    largest = E4M3_MAX

    def problem(self, fmt: QuantFormat) -> str | None:
        if fmt.block_type is not None or fmt.block_shape is not None:
            return "FP8 quantizers are per-tensor or per-channel, not block-scaled"
        return None

    def selects(self, num_bits, blocks: dict | None) -> bool:
        return num_bits in self.spellings and blocks is None

    def parse(self, reader, cfg: dict, where: str) -> QuantFormat:
        return QuantFormat(self.name, axis=cfg.get("axis"), use_constant_amax=cfg.get("use_constant_amax", False))

    def describe(self, fmt: QuantFormat) -> str:
        return self.name if fmt.axis is None else f"{self.name} axis={fmt.axis}"

    def buffer_shapes(self, fmt: QuantFormat, weight: torch.Tensor | None) -> dict[str, torch.Size]:
        if fmt.axis is None or weight is None:
            return {"_amax": torch.Size([])}
        axis = fmt.axis % weight.dim()
        return {"_amax": torch.Size([n if d == axis else 1 for d, n in enumerate(weight.shape)])}

    def fake_quant(self, fmt, x, amax, global_amax, block_amax):
        return fp8_fake_quant(x, amax)

    def clamp_bound(self, amax, global_amax):
        return nonzero_amax(amax)

    def weight_tensors(self, module: str, shape: tuple[int, int]) -> dict[str, Spec]:
        return {f"{module}.weight": Spec(tuple(shape), (self.weight_dtype,), "weight"), f"{module}.weight_scale": SCALAR}

    def quantize_weights(self, x, amax, rows: Sequence[int], block_amax):
        scale = fp8_scale(amax)
        counts = torch.tensor(rows).to(x.device, non_blocking=True)
        values = cast_e4m3(x.float() / scale.repeat_interleave(counts, output_size=sum(rows)).unsqueeze(1))
        return (values.split(rows), None, scale.unbind(0)), []

    def weight_checkpoint(self, module, values, blocks, scale):
        return [(f"{module}.weight", values), (f"{module}.weight_scale", scale)]

    def check_values(self, module, tensors):
        problems, largest = e4m3_block_largest(module, tensors, None)  # one scale for the whole weight
        return problems, None if largest is None else largest.item()

    def top_warning(self, where, tops):
        return calibrated_top_warning(where, max(tops), "weight value", "weight_scale", "amax / 448")
