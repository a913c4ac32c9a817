"""FP8 with block scales (docs/formats.md, "FP8 blocks"), DeepSeek-V3's release format: a weight's 128x128 blocks
each with a float32 scale (block amax / 448), an activation's per-token groups of 128 each with a dynamic float32
scale, both from the data alone (the amax a quantizer still collects is unused; numerics/fp8_blocks.py).

In a checkpoint (docs/checkpoint.md, "FP8 128x128 blocks") each quantized weight is stored as the engines' native
`fp8` method and DeepSeek-V3 hold it: `M.weight` float8_e4m3fn [out, in] with `M.weight_scale_inv` float32
[ceil(out / 128), ceil(in / 128)], the dequantization multiplier (vLLM 0.33 and SGLang 0.5.23 fp8.py
Fp8LinearMethod / Fp8MoEMethod register exactly these; "The weight_scale_inv name is intentional for deepseekv3").
Both engines quantize a block-FP8 layer's input themselves, per token in groups of 128 (no input_scale)."""

from __future__ import annotations

from typing import Sequence

import torch

from dist_quant.formats.base import DYNAMIC, NumberFormat, QuantFormat, Spec, e4m3_block_largest
from dist_quant.kernels import block_formats as kernels
from dist_quant.numerics import fp8_blocks
from dist_quant.numerics.fp8 import E4M3_MAX

WEIGHT_BLOCK, GROUP = fp8_blocks.WEIGHT_BLOCK, (fp8_blocks.GROUP_SIZE,)


class FP8BlockFormat(NumberFormat):
    name = "fp8_block"
    # ModelOpt 0.47's name (its weight-only preset's; vLLM and SGLang run such layers with 1x128 activation groups),
    # upper-cased as both engines read it: a MIXED_PRECISION layer's quant_algo, with its block size as group_size
    algo = "FP8_PB_WO"
    config_entries = {"group_size": WEIGHT_BLOCK[0]}
    config_group = False  # ModelOpt's convert_hf_config.py has no config group for it: the group is its algo
    weight_block = WEIGHT_BLOCK  # (rows, columns)
    config_bits = 8
    weight_dtype = torch.float8_e4m3fn
    scale_name = "weight_scale_inv"  # DeepSeek-V3's and the engines' native name
    blocks_span_rows = True
    weight_bytes = 1 + 4 / (WEIGHT_BLOCK[0] * WEIGHT_BLOCK[1])
    spellings = ("e4m3", 8)
    static_inputs = False  # per block, from the data
    weight_amax = False

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
            f"{module}.{self.scale_name}": Spec(blocks, (torch.float32,), "block"),
        }

    def quantize_weights(self, x, amax, rows: Sequence[int], block_amax):
        # each weight its own blocks, as its quantizer's fake quantization has them (the same reference function)
        pieces = [fp8_blocks.fp8_block_quantize(w, WEIGHT_BLOCK) for w in x.split(rows)]
        return ([v for v, _ in pieces], [s for _, s in pieces], [None] * len(rows)), []

    def split_blocks(self, to_hf, blocks, rows):
        # each weight row takes its block's scale, rows split as the weight's; a module's rows must then be whole
        # blocks, each row of a block with the block's scale
        rows_of_blocks, per_row = WEIGHT_BLOCK[0], blocks.repeat_interleave(WEIGHT_BLOCK[0], 0)[:rows]
        pieces = to_hf(per_row)
        if len(pieces) == 1:
            return [blocks], None
        if any(piece.shape[0] % rows_of_blocks for piece in pieces):
            sizes = ", ".join(str(piece.shape[0]) for piece in pieces)
            raise ValueError(f"its modules have {sizes} rows: not whole blocks of {rows_of_blocks} rows")
        grids = [piece.view(-1, rows_of_blocks, piece.shape[1]) for piece in pieces]
        straddles = torch.stack([(grid != grid[:, :1]).any() for grid in grids]).any()
        return [grid[:, 0].contiguous() for grid in grids], straddles

    def weight_checkpoint(self, module, values, blocks, scale):
        return [(f"{module}.weight", values), (f"{module}.{self.scale_name}", blocks)]

    def check_values(self, module, tensors):
        problems, largest = e4m3_block_largest(module, tensors, WEIGHT_BLOCK)
        scales = tensors.get(f"{module}.{self.scale_name}")
        if scales is not None and not (torch.isfinite(scales) & (scales > 0)).all():
            problems.append(f"{module}.{self.scale_name} holds zero, negative or non-finite scales")
        if problems or largest is None or scales is None:
            return problems, None
        if not torch.isfinite(largest * scales).all():  # as the engines dequantize: in float32
            return [f"{module} dequantizes to non-finite values"], None
        nonzero = largest[largest > 0]
        return [], nonzero.min().item() if nonzero.numel() else None

    def top_warning(self, where, tops):
        # a scale of block amax / 448 takes the block's amax to 448 exactly (an all-zero block is left out)
        if min(tops) >= E4M3_MAX:
            return None
        return (
            f"{where}: a block's largest value is {min(tops):g}, not 448: its {self.scale_name} is not the block's "
            "amax / 448, the scale FP8 blocks take"
        )
