"""MXFP8 and MXFP4 (OCP Microscaling; docs/formats.md, "MX"): E4M3 or E2M1 values in blocks of 32 along the last
dim, one E8M0 power-of-two scale per block, chosen from the block alone (dynamic, no calibrated amax: the amax a
quantizer still collects is unused), as ModelOpt 0.47 computes it (numerics/mx.py)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from dist_quant.formats.base import DYNAMIC, NumberFormat, QuantFormat, Spec, e4m3_block_largest
from dist_quant.kernels import block_formats as kernels
from dist_quant.numerics import mx
from dist_quant.numerics.fp8 import E4M3_MAX
from dist_quant.numerics.nvfp4 import E2M1_MAX


class MXFormat(NumberFormat):
    block = mx.MX_BLOCK_SIZE
    static_inputs = False  # per block, from the data
    weight_amax = False
    element: str  # the element format's recipe name
    element_max: float  # its largest value
    quantize: Callable
    dequantize: Callable
    fake: Callable
    packed: bool  # two elements a byte

    def problem(self, fmt: QuantFormat) -> str | None:
        if fmt.axis is not None or fmt.block_type != DYNAMIC or fmt.block_shape is not None or fmt.use_constant_amax:
            return f"{self.algo} has dynamic blocks of {self.block} and nothing else to set"
        return None

    def selects(self, num_bits, blocks: dict | None) -> bool:
        return num_bits in self.spellings and (blocks or {}).get("scale_bits") == "e8m0"

    def parse(self, reader, cfg: dict, where: str) -> QuantFormat:
        if cfg.get("axis") is not None:
            raise reader.fail(f"{where}.axis", f"{self.element} with e8m0 block scales is block-scaled along the last dimension; axis must be null")
        if cfg.get("use_constant_amax"):
            raise reader.fail(where, f"use_constant_amax: {self.algo} scales come from each block of {self.block}, not from an amax")
        blocks = reader.mapping(cfg["block_sizes"], f"{where}.block_sizes", (-1, "type", "scale_bits"), (-1,))
        if blocks[-1] != self.block or isinstance(blocks[-1], bool):
            raise reader.fail(f"{where}.block_sizes", f"block size must be {self.block} for {self.algo}, got {blocks[-1]!r}")
        reader.choice(blocks.get("type", DYNAMIC), (DYNAMIC,), f"{where}.block_sizes.type")
        return QuantFormat(self.name, block_type=DYNAMIC)

    def describe(self, fmt: QuantFormat) -> str:
        return f"{self.name} block{self.block}"

    def fake_quant(self, fmt, x, amax, global_amax, block_amax):
        return self.fake(x)

    def clamp_bound(self, amax, global_amax):
        return torch.full((), float("inf"), device=amax.device)  # scales follow the data: nothing saturates

    def weight_tensors(self, module: str, shape: tuple[int, int]) -> dict[str, Spec]:
        out, features = shape
        return {
            f"{module}.weight": Spec((out, features // 2 if self.packed else features), (self.weight_dtype,), "weight"),
            f"{module}.weight_scale": Spec((out, features // self.block), (torch.uint8,), "block"),
        }

    def quantize_weights(self, x, amax, rows: Sequence[int], block_amax):
        values, scales = self.quantize(x)
        mismatch = self.dequantize(values, scales, x.dtype) != self.fake(x)
        checks = [(f"the exported weights do not dequantize to the fake-quant weights", (mismatch & ~x.isnan()).any())]
        return (values.split(rows), scales.split(rows), [None] * len(rows)), checks

    def weight_checkpoint(self, module, values, blocks, scale):
        return [(f"{module}.weight", values), (f"{module}.weight_scale", blocks)]

    def check_values(self, module, tensors):
        scales = tensors.get(f"{module}.weight_scale")
        problems, largest = ([], None) if self.packed else e4m3_block_largest(module, tensors, (1, self.block))
        if scales is not None and (scales == mx.E8M0_NAN).any():
            problems.append(f"{module}.weight_scale holds NaN scales (0x{mx.E8M0_NAN:X})")
        if problems or largest is None or scales is None:
            return problems, None
        if not torch.isfinite(largest * mx.decode_e8m0(scales)).all():  # as the engines dequantize: in float32
            return [f"{module} dequantizes to non-finite values"], None
        nonzero = largest[largest > 0]
        return [], nonzero.min().item() if nonzero.numel() else None

    def top_warning(self, where, tops):
        # the shared exponent 2^ceil(log2(amax / element max)) puts every block's amax above half the element max
        if min(tops) >= self.element_max / 2:
            return None
        return (
            f"{where}: a block's largest value is {min(tops):g}, below {self.element_max / 2:g}: its E8M0 scale is not "
            f"the smallest power of two that holds the block (2^ceil(log2(amax / {self.element_max:g}))), the "
            f"scale {self.algo} takes"
        )


class MXFP8Format(MXFormat):
    name = "mxfp8"
    algo = "MXFP8"
    config_bits = 8
    config_entries = {"group_size": mx.MX_BLOCK_SIZE}
    config_groups = False  # ModelOpt 0.47 convert_hf_config.py writes none for MXFP8 alone
    weight_dtype = torch.float8_e4m3fn
    weight_bytes = 1 + 1 / mx.MX_BLOCK_SIZE
    spellings = ("e4m3", 8)
    element, element_max, packed = "e4m3", E4M3_MAX, False
    quantize, dequantize, fake = staticmethod(kernels.mxfp8_quantize), staticmethod(mx.mxfp8_dequantize), staticmethod(kernels.mxfp8_fake_quant)


class MXFP4Format(MXFormat):
    name = "mxfp4"
    algo = "MXFP4"
    config_bits = 4
    weight_dtype = torch.uint8
    weight_bytes = 0.5 + 1 / mx.MX_BLOCK_SIZE
    spellings = ("e2m1", 4)
    element, element_max, packed = "e2m1", E2M1_MAX, True
    quantize, dequantize, fake = staticmethod(kernels.mxfp4_quantize), staticmethod(mx.mxfp4_dequantize), staticmethod(kernels.mxfp4_fake_quant)
