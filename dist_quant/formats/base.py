"""What a number format is to the rest of dist_quant (docs/formats.md): one `NumberFormat` object per format owns
its recipe keys, its fake and real quantization (reference or kernel, through `dist_quant.kernels`), the tensors it
writes into a checkpoint with their shapes and dtypes, its bytes per element, and whether it has a per-tensor scale
over its block scales that fused siblings must share. `QuantFormat` is one quantizer's configuration of a format,
as a recipe gives it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from dist_quant.numerics.fp8 import E4M3_MAX

DYNAMIC = "dynamic"
STATIC = "static"


@dataclass(frozen=True)
class QuantFormat:
    """What a quantizer produces. `kind`: the format's name (FORMATS). `axis` (per-tensor formats): None =
    per-tensor, else the kept (per-channel) dim. `block_type` (block-scaled formats): dynamic = block amax from the
    tensor each time, static = a stored per-block amax. `use_constant_amax`: the amax is the format's largest
    value (a cast: scale 1). `block_shape`: the blocks of a format whose blocks a recipe sizes."""

    kind: str
    axis: int | None = None
    block_type: str | None = None
    use_constant_amax: bool = False
    # FP8 blocks: (rows, columns) of a weight's blocks, or (n,) for per-token groups of n of an activation
    block_shape: tuple[int, ...] | None = None

    def __post_init__(self):
        from dist_quant.formats import FORMATS  # the registry imports this module

        if self.kind not in FORMATS:
            raise ValueError(f"unknown quantization format {self.kind!r}")
        problem = FORMATS[self.kind].problem(self)
        if problem:
            raise ValueError(problem)
        # its NumberFormat, held (not a field: no part of equality) since every fake quant asks for it
        object.__setattr__(self, "number", FORMATS[self.kind])

    def describe(self) -> str:
        return self.number.describe(self)


@dataclass(frozen=True)
class Spec:
    """One checkpoint tensor as a format writes it. role: "float" (unquantized), "weight" (quantized), "block"
    (block scales) or "scale" (a float32 scalar)."""

    shape: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    role: str


SCALAR = Spec((), (torch.float32,), "scale")


class NumberFormat:
    """One number format. Subclasses set the attributes and implement the methods."""

    name: str  # QuantFormat.kind
    algo: str  # its name in checkpoint configs: quant_algo of W-and-A layers, kv_cache_quant_algo
    config_bits: int  # num_bits in its config groups
    config_entries: dict = {}  # what its layers add to the checkpoint configs (NVFP4: group_size)
    weight_dtype: torch.dtype  # its weights' dtype in the checkpoint
    spellings: tuple = ()  # the recipe's num_bits values that select it
    block: int | None = None  # elements per block scale along the last dim; None: per tensor or channel
    global_scale: bool = False  # a per-tensor scale over the block scales, which fused siblings share
    weight_bytes: float = 1.0  # checkpoint bytes per weight element, its block scales included
    scale_divisor: float = 1.0  # the exported per-tensor scale (input_scale, the weights' per-tensor scale) = amax / this
    largest: float = 1.0  # the amax of a cast (use_constant_amax): the element format's largest value
    segmented: bool = False  # row segments of one tensor, each its own quantizer's, fake-quantize in one launch
    static_inputs: bool = True  # a quantized input has a calibrated scale in the checkpoint (else dynamic, none)
    config_groups: bool = True  # ModelOpt writes config_groups for a checkpoint of this format alone
    config_group: bool = True  # ModelOpt's convert_hf_config.py describes its layers in a config group
    # its block scales cover rows too (2-D blocks): a fused Megatron weight's blocks must split whole into its
    # Hugging Face modules (`split_blocks`)
    blocks_span_rows: bool = False

    def problem(self, fmt: QuantFormat) -> str | None:
        """Why this configuration of the format cannot be; None when it can."""
        return None

    def selects(self, num_bits, blocks: dict | None) -> bool:
        """Whether a recipe cfg with this num_bits and block_sizes asks for this format (formats.select)."""
        return num_bits in self.spellings

    def parse(self, reader, cfg: dict, where: str) -> QuantFormat:
        """A recipe entry's cfg (its keys checked, num_bits read) -> the quantizer configuration. `reader`: the
        recipe reader (recipe/schema.py), whose `fail`, `typed` and `choice` name the recipe and the entry."""
        raise NotImplementedError

    def describe(self, fmt: QuantFormat) -> str:
        raise NotImplementedError

    def multiple(self, fmt: QuantFormat) -> tuple[int, ...] | None:
        """What the quantized tensor's last dims must be multiples of (its blocks' shape), None: anything."""
        return None if self.block is None else (self.block,)

    # -- calibration and fake quantization ---------------------------------------------------------------
    def block_amax(self, x: torch.Tensor) -> torch.Tensor:
        """Per-block amax of x (static blocks)."""
        raise NotImplementedError

    def buffer_shapes(self, fmt: QuantFormat, weight: torch.Tensor | None) -> dict[str, torch.Size]:
        """The calibrated buffers a quantizer of this configuration keeps for the tensor it quantizes (`weight`,
        or an activation: None) -> their shapes: by default a per-tensor amax."""
        return {"_amax": torch.Size([])}

    def fake_quant(self, fmt: QuantFormat, x: torch.Tensor, amax: torch.Tensor, global_amax: torch.Tensor | None,
                   block_amax: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def fake_quant_segments(self, x: torch.Tensor, global_amax: torch.Tensor, rows: Sequence[int],
                            block_amax: torch.Tensor | None, row_ends: torch.Tensor | None = None) -> torch.Tensor:
        """x's row segments, each with its own per-tensor amax, in one launch (only where `segmented`);
        `row_ends`: `rows` as cumulative counts on x's device (int32), where the caller has them."""
        raise NotImplementedError

    def clamp_bound(self, amax: torch.Tensor, global_amax: torch.Tensor | None) -> torch.Tensor:
        """The |x| beyond which fake quantization saturates (the straight-through gradient stops there)."""
        raise NotImplementedError

    # -- the checkpoint ----------------------------------------------------------------------------------
    def weight_tensors(self, module: str, shape: tuple[int, int]) -> dict[str, Spec]:
        """A quantized linear weight's tensors in the checkpoint (its input_scale aside)."""
        raise NotImplementedError

    def quantize_weights(self, x: torch.Tensor, amax: torch.Tensor, rows: Sequence[int],
                         block_amax: torch.Tensor | None) -> tuple[tuple, list[tuple[str, torch.Tensor]]]:
        """Row segments of x (one weight each, per-tensor amax each) quantized for the checkpoint in one launch
        -> ((values per weight, block scales per weight or None, per-tensor scale per weight as 0-d tensors),
        checks: [(what went wrong, 0-d bool tensor True where it did)], left on the device for one host sync)."""
        raise NotImplementedError

    def split_blocks(self, to_hf, blocks: torch.Tensor, rows: int) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """A quantized Megatron weight's block scales split as `to_hf` splits its `rows` into Hugging Face modules
        -> (the modules' block scales, a 0-d bool tensor True where some block would straddle two modules, or None);
        ValueError (why) where the split cannot be made. By default a block scale row is a weight row."""
        return to_hf(blocks), None

    def weight_checkpoint(self, module: str, values: torch.Tensor, blocks: torch.Tensor | None,
                          scale: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """One weight's checkpoint tensors from `quantize_weights`' pieces (named as `weight_tensors`)."""
        raise NotImplementedError

    # -- the verifier's value checks (export/verify.py) ----------------------------------------------------
    # True: the weight's scales follow from a calibrated amax, which fused siblings share, so the value max
    # calibration puts at the top of the range is looked for among the siblings together; False: each block's
    # scale follows from the block alone, and every block is judged on its own
    weight_amax: bool = True

    def check_values(self, module: str, tensors: Mapping[str, torch.Tensor]) -> tuple[list[str], float | None]:
        """One quantized weight's stored values, `tensors` (checkpoint name -> tensor as stored, for those of
        `weight_tensors` whose dtype and shape are right; scalar scales only where positive and finite) ->
        (problems, one line each naming the tensor or module; `top`, what `top_warning` judges, None where the
        weight holds nothing to judge). Packed weights are not given (every byte is a valid pair of codes)."""
        raise NotImplementedError

    def top_warning(self, where: str, tops: Sequence[float]) -> str | None:
        """A warning when the `tops` of a weight (or of fused siblings that share a calibrated amax: `weight_amax`)
        show scales that are not what the format's scale rule makes of the values, else None."""
        raise NotImplementedError


def e4m3_block_largest(module: str, tensors: Mapping[str, torch.Tensor], block: tuple[int, int] | None) -> tuple[list[str], torch.Tensor | None]:
    """A stored float8_e4m3fn weight [out, in] `module.weight` -> (problems: NaN bytes; the largest magnitude in
    each [rows, columns] `block` as float32 [ceil(out / rows), ceil(in / columns)], tail blocks partial, or in the
    whole weight (`block` None); None where the weight is absent, empty or holds NaN). From the codes in one pass:
    without the sign bit they grow with the magnitude, and the largest, 0x7F, is E4M3's NaN."""
    weight = tensors.get(f"{module}.weight")
    if weight is None or not weight.numel():
        return [], None
    codes = weight.view(torch.uint8) & 0x7F
    if block is None:
        largest = codes.max().reshape(1, 1)
    else:
        (out, features), (rows, columns) = codes.shape, block
        if out % rows or features % columns:
            padded = torch.zeros(-(-out // rows) * rows, -(-features // columns) * columns, dtype=torch.uint8)
            padded[:out, :features] = codes
            codes = padded
        grid = codes.view(codes.shape[0] // rows, rows, codes.shape[1] // columns, columns)
        largest = grid.amax(3) if rows == 1 else grid.amax(3).amax(1)  # the last dims first: the faster order
        largest = largest.reshape(grid.shape[0], grid.shape[2])
    if (largest == 0x7F).any():
        return [f"{module}.weight holds NaN bytes"], None
    return [], largest.view(torch.float8_e4m3fn).float()


def calibrated_top_warning(where: str, largest: float, what: str, scale: str, calibrated: str) -> str | None:
    """For formats whose scale follows from a calibrated amax (`weight_amax`): max calibration makes `scale` the
    weight's (the siblings') `calibrated`, so the block or value holding the amax comes out at exactly 448, the
    top of FP8's range; short of it, the scale was not made from this weight's amax (block scales searched by MSE
    may legitimately stay below)."""
    if largest >= E4M3_MAX:
        return None
    return (
        f"{where}: no {what} reaches 448, the top of FP8's range (the largest is {largest:g}): {scale} is not the "
        f"weight's {calibrated} that max calibration sets (expected only for MSE-searched blocks)"
    )

