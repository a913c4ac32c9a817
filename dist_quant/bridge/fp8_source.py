"""FP8 block-scaled source checkpoints, read as the unquantized checkpoints they stand for.

DeepSeek-V3/R1, Kimi-K2 and the Qwen3 "-FP8" releases (config.json's quantization_config: quant_method 'fp8' with
weight_block_size, `config.FP8_SOURCE_KEYS`) store linear weights as float8_e4m3fn `X.weight` next to a float32
`X.weight_scale_inv` holding one scale per block of weight_block_size, [ceil(rows / block rows), ceil(columns /
block columns)] (a tail block is partial); every other tensor (embeddings, norms, routers, lm_head, biases) is
stored unquantized. DeepSeek's reference dequantization (DeepSeek-V3 inference/kernel.py `weight_dequant`, which
its fp8_cast_bf16.py runs with bfloat16 as torch's default dtype) takes the FP8 value to float32, multiplies it by
its block's float32 scale in float32, and stores the product in the default dtype: one rounding. Here that dtype
is the checkpoint's own (config.json's dtype / torch_dtype), the dtype dist_quant computes in and exports
unquantized tensors in by default.
"""

from __future__ import annotations

import torch

from dist_quant.bridge.mappings import BridgeError

# The block scale of weight `X.weight` is `X.weight_scale_inv` (DeepSeek's fp8_cast_bf16.py: f"{weight_name}_scale_inv")
SCALE_SUFFIX = "_scale_inv"
FP8_STORED = "F8_E4M3"  # safetensors' name for float8_e4m3fn
SCALE_STORED = "F32"


class FP8BlockReader:
    """A SafetensorsReader of an FP8 block-scaled checkpoint as the unquantized checkpoint it stands for: the block
    scales' names are hidden, an FP8 weight reports `dtype` (the dtype it is dequantized to), and reading it, or a
    slice of it along either dimension (any bounds: slices need not follow the blocks), dequantizes exactly what
    was asked for, reading only the scales of the blocks it touches. `kv_scales`: the K/V cache scales of a
    checkpoint that declares an FP8 KV cache, hidden as well. Every other tensor is read as stored.
    BridgeError, one line naming the tensor and its file, for a scale without its weight, an FP8 weight without
    its scale, a scale of a tensor that is not FP8, a scale not float32 or of another shape than the weight's
    blocks, an FP8 tensor that is not 2-D, and (as they are read) scales that are NaN or infinite."""

    def __init__(self, reader, block: tuple[int, int], dtype: torch.dtype, kv_scales: set[str] = frozenset()):
        self.reader = reader
        self.block = block
        self.dequantized_dtype = dtype
        stored = reader.names()
        present = set(stored)
        self.scales: dict[str, str] = {}  # weight -> its block scale
        for name in stored:
            if name.endswith(SCALE_SUFFIX):
                weight = name.removesuffix(SCALE_SUFFIX)
                if weight not in present:
                    raise BridgeError(f"{reader.where(name)}: a block scale without its weight {weight}")
                self.scales[weight] = name
        # an FP8 KV cache's scales (kv_cache_quant_algo) are hidden too: calibration computes the cache's own
        self._names = [name for name in stored if not name.endswith(SCALE_SUFFIX) and name not in kv_scales]
        self._checked: set[str] = set()

    def names(self) -> list[str]:
        return self._names

    def where(self, name: str) -> str:
        return self.reader.where(name)

    def shape(self, name: str) -> torch.Size:
        return self.reader.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.dequantized_dtype if self._quantized(name) else self.reader.dtype(name)

    def _quantized(self, name: str) -> bool:
        """Whether `name` is an FP8 weight to dequantize, its scale checked against it (headers only, once)."""
        if name in self._checked:
            return True
        scale = self.scales.get(name)
        stored = self.reader.stored_dtype(name)
        if stored != FP8_STORED:
            if scale is not None:
                raise BridgeError(f"{self.where(scale)}: a block scale of {name}, which is {stored}, not float8_e4m3fn ({FP8_STORED})")
            return False
        if scale is None:
            raise BridgeError(f"{self.where(name)}: FP8 without its block scale {name}{SCALE_SUFFIX}")
        shape = tuple(self.shape(name))
        if len(shape) != 2:
            raise BridgeError(f"{self.where(name)}: FP8 of shape {shape}; block-scaled weights are 2-D")
        if self.reader.stored_dtype(scale) != SCALE_STORED:
            raise BridgeError(f"{self.where(scale)}: {self.reader.stored_dtype(scale)}, expected float32 ({SCALE_STORED}) block scales")
        (rows, columns), (block_rows, block_columns) = shape, self.block
        expected = (-(-rows // block_rows), -(-columns // block_columns))
        if tuple(self.shape(scale)) != expected:
            raise BridgeError(
                f"{self.where(scale)}: shape {tuple(self.shape(scale))}, expected {expected}: one scale per "
                f"{block_rows}x{block_columns} block of {name} {shape} (config.json's weight_block_size)"
            )
        self._checked.add(name)
        return True

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        values = self.reader.read(name, dim, start, stop)
        if not self._quantized(name):
            return values
        block = self.block
        bounds = [(0, length) for length in self.shape(name)]  # the rows and columns read
        first = [0, 0]  # the first block read along each dimension
        if dim is None:
            scales = self.reader.read(self.scales[name])
        else:
            bounds[dim], first[dim] = (start, stop), start // block[dim]
            scales = self.reader.read(self.scales[name], dim, first[dim], -(-stop // block[dim]))
        if not torch.isfinite(scales).all():
            raise BridgeError(f"{self.where(self.scales[name])}: NaN or Inf among the block scales")
        rows, columns = (torch.arange(*bounds[d]) // block[d] - first[d] for d in (0, 1))
        return (values.to(torch.float32) * scales[rows][:, columns]).to(self.dequantized_dtype)


def source_note(block: tuple[int, int] | None, dtype: torch.dtype, kv_cache: bool = False) -> str | None:
    """What reading a source checkpoint does to its weights, in one line for a person; None: nothing.
    `kv_cache`: it declares FP8 KV cache scales, which are not read."""
    if block is None:
        return None
    return (
        f"the source is FP8 block-scaled ({block[0]}x{block[1]} blocks, float32 scales): its FP8 weights are "
        f"dequantized to {str(dtype).removeprefix('torch.')} on load"
        + ("; its KV cache scales are not read (calibration computes the cache's own)" if kv_cache else "")
    )
