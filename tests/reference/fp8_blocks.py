"""FP8 block-scaled checkpoints as DeepSeek-V3 ships them, made from unquantized ones, and the reference
dequantization they stand for (written independently of dist_quant/bridge/fp8_source.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

E4M3_MAX = 448.0
# DeepSeek-V3's quantization_config (its README_WEIGHTS.md)
DEEPSEEK_V3 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
SCALES_FILE = "model-00002-of-00002.safetensors"  # the block scales, in a file of their own: a weight's scale may lie in another shard


def quantized_in_blocks(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """float8_e4m3fn values and float32 scales (amax / 448) per block; tail blocks zero-padded to full blocks for
    their amax, as DeepSeek's README_WEIGHTS.md says. A block of zeros gets the scale 1."""
    rows, columns = weight.shape
    block_rows, block_columns = block
    grid = (-(-rows // block_rows), -(-columns // block_columns))
    padded = torch.zeros(grid[0] * block_rows, grid[1] * block_columns)
    padded[:rows, :columns] = weight.float()
    blocks = padded.view(grid[0], block_rows, grid[1], block_columns)
    scale = blocks.abs().amax((1, 3)) / E4M3_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    values = (blocks / scale[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return values.view(padded.shape)[:rows, :columns].contiguous(), scale


def dequantized(values: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """The reference: the scales expanded over the whole tensor (repeat_interleave), value x scale in float32,
    then one rounding to `dtype`."""
    rows, columns = values.shape
    expanded = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :columns]
    return (values.float() * expanded).to(dtype)


def block_quantized(name: str, tensor: torch.Tensor) -> bool:
    """Whether DeepSeek-V3 would store the tensor in FP8: a linear layer's 2-D weight, not the embedding, the
    head, a norm or a router."""
    return (
        tensor.dim() == 2 and name.endswith(".weight") and not name.endswith(".gate.weight")
        and not any(part in name for part in ("embed_tokens", "lm_head", "norm"))
    )


def fp8_checkpoints(source: Path, root: Path, block: tuple[int, int] = (128, 128), **quantization) -> tuple[Path, Path]:
    """From the unquantized checkpoint `source` (one model.safetensors): `root/fp8`, its linear weights quantized
    in blocks (weights in one file, scales in another, an index naming both) with config.json's
    quantization_config (DEEPSEEK_V3 with `block` and `quantization`), and `root/dequantized`, the unquantized
    checkpoint it stands for: `source` with those weights replaced by their reference dequantization in the
    checkpoint's dtype. Side files (tokenizer) go to both."""
    config = json.loads((source / "config.json").read_text())
    dtype = getattr(torch, config.get("dtype") or config.get("torch_dtype"))
    fp8, reference = root / "fp8", root / "dequantized"
    for directory in (fp8, reference):
        shutil.copytree(source, directory, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    tensors = load_file(source / "model.safetensors")
    weights, scales, plain = {}, {}, {}
    for name, tensor in tensors.items():
        if block_quantized(name, tensor):
            weights[name], scales[f"{name}_scale_inv"] = quantized_in_blocks(tensor, block)
            plain[name] = dequantized(weights[name], scales[f"{name}_scale_inv"], block, dtype)
        else:
            weights[name] = plain[name] = tensor
    save_file(weights, fp8 / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file(scales, fp8 / SCALES_FILE, metadata={"format": "pt"})
    weight_map = {**dict.fromkeys(weights, "model-00001-of-00002.safetensors"), **dict.fromkeys(scales, SCALES_FILE)}
    (fp8 / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    quantization_config = {**DEEPSEEK_V3, "weight_block_size": list(block), **quantization}
    (fp8 / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}, indent=2))
    save_file(plain, reference / "model.safetensors", metadata={"format": "pt"})
    return fp8, reference


def transformers_dequantized(directory: Path) -> dict[str, torch.Tensor]:
    """The outside oracle for an FP8 block-scaled checkpoint: transformers 5 loads it with FineGrainedFP8
    (dequantize=True); -> its weights by checkpoint name, the experts it fuses per layer ([experts, gate rows + up
    rows, hidden] and [experts, hidden, width]) split back into each expert's gate_proj, up_proj and down_proj."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=transformers.FineGrainedFP8Config(dequantize=True), dtype=torch.bfloat16
    )
    weights = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):
            layer = name.removesuffix(".gate_up_proj")
            for e, expert in enumerate(tensor):
                gate, up = expert.chunk(2)
                weights[f"{layer}.{e}.gate_proj.weight"], weights[f"{layer}.{e}.up_proj.weight"] = gate, up
        elif name.endswith("mlp.experts.down_proj"):
            layer = name.removesuffix(".down_proj")
            weights.update({f"{layer}.{e}.down_proj.weight": expert for e, expert in enumerate(tensor)})
        else:
            weights[name] = tensor
    return weights
