"""FP8 with block scales (docs/formats.md, "FP8 blocks"), DeepSeek-V3's release format: a weight's 128x128 blocks
each with a float32 scale (block amax / 448), an activation's per-token groups of 128 each with a dynamic float32
scale, both from the data alone (the amax a quantizer still collects is unused; numerics/fp8_blocks.py)."""

from __future__ import annotations

from typing import Sequence

import torch

from dist_quant.formats.base import DYNAMIC, NumberFormat, QuantFormat, Spec
from dist_quant.kernels import block_formats as kernels
from dist_quant.numerics import fp8_blocks

WEIGHT_BLOCK, GROUP = fp8_blocks.WEIGHT_BLOCK, (fp8_blocks.GROUP_SIZE,)


class FP8BlockFormat(NumberFormat):
    name = "fp8_block"
    algo = "FP8_PB"
    config_bits = 8
    weight_dtype = torch.float8_e4m3fn
    weight_bytes = 1 + 4 / (WEIGHT_BLOCK[0] * WEIGHT_BLOCK[1])
    spellings = ("e4m3", 8)
    static_inputs = False  # per block, from the data

    def problem(self, fmt: QuantFormat) -> str | None:
        if fmt.axis is not None or fmt.block_shape not in (WEIGHT_BLOCK, GROUP) or fmt.use_constant_amax:
            return f"FP8 blocks are {WEIGHT_BLOCK[0]}x{WEIGHT_BLOCK[1]} (weights) or per-token groups of {GROUP[0]} (activations)"
        return None

    def selects(self, num_bits, blocks: dict | None) -> bool:
        return num_bits in self.spellings and blocks is not None and blocks.get("scale_bits") != "e8m0"

    def parse(self, reader, cfg: dict, where: str) -> QuantFormat:
        if cfg.get("axis") is not None:
            raise reader.fail(f"{where}.axis", "e4m3 with block_sizes is block-scaled; axis must be null")
        if cfg.get("use_constant_amax"):
            raise reader.fail(where, "use_constant_amax: FP8 block scales come from each block, not from an amax")
        blocks = reader.mapping(cfg["block_sizes"], f"{where}.block_sizes", (-1, -2, "type", "scale_bits"), (-1,))
        reader.choice(blocks.get("scale_bits", "e4m3"), ("e4m3", "e8m0"), f"{where}.block_sizes.scale_bits")
        shape = tuple(blocks[k] for k in (-2, -1) if k in blocks)
        if shape == WEIGHT_BLOCK and blocks.get("type", "static") in ("static", DYNAMIC):
            return QuantFormat(self.name, block_type=DYNAMIC, block_shape=WEIGHT_BLOCK)
        if shape == GROUP and blocks.get("type") == DYNAMIC:
            return QuantFormat(self.name, block_type=DYNAMIC, block_shape=GROUP)
        raise reader.fail(
            f"{where}.block_sizes",
            f"e4m3 blocks are {{-1: {WEIGHT_BLOCK[1]}, -2: {WEIGHT_BLOCK[0]}}} (weights) or {{-1: {GROUP[0]}, type: dynamic}} "
            f"(per-token groups of activations), or e8m0 scales over blocks of 32 (MXFP8); got {dict(blocks)}",
        )

    def describe(self, fmt: QuantFormat) -> str:
        if fmt.block_shape == GROUP:
            return f"fp8 groups of {GROUP[0]}"
        return f"fp8 blocks {fmt.block_shape[0]}x{fmt.block_shape[1]}"

    def multiple(self, fmt: QuantFormat) -> tuple[int, ...]:
        return fmt.block_shape

    def fake_quant(self, fmt, x, amax, global_amax, block_amax):
        if fmt.block_shape == GROUP:
            return kernels.fp8_group_fake_quant(x, GROUP[0])
        return fp8_blocks.fp8_block_fake_quant(x, fmt.block_shape)

    def clamp_bound(self, amax, global_amax):
        return torch.full((), float("inf"), device=amax.device)  # scales follow the data: nothing saturates

    def weight_tensors(self, module: str, shape: tuple[int, int]) -> dict[str, Spec]:
        out, features = shape
        blocks = (-(-out // WEIGHT_BLOCK[0]), -(-features // WEIGHT_BLOCK[1]))
        return {
            f"{module}.weight": Spec((out, features), (self.weight_dtype,), "weight"),
            f"{module}.weight_scale": Spec(blocks, (torch.float32,), "scale"),
        }

    def quantize_weights(self, x, amax, rows: Sequence[int], block_amax):
        # each weight its own blocks: rows of two weights never share one
        pieces = [fp8_blocks.fp8_block_quantize(w, WEIGHT_BLOCK) for w in x.split(rows)]
        return ([v for v, _ in pieces], [s for _, s in pieces], [None] * len(rows)), []

    def weight_checkpoint(self, module, values, blocks, scale):
        return [(f"{module}.weight", values), (f"{module}.weight_scale", blocks)]
