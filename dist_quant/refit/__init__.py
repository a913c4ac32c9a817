"""Streaming refit: a calibrated sharded Megatron model's weights and quantizer state, as Hugging Face tensors,
into a live transformers model (or any consumer), one tensor at a time."""

from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch
from torch import nn

from dist_quant.bridge.io import export_hf_stream
from dist_quant.bridge.models import ModelBridge
from dist_quant.calibrate.pipeline import promote
from dist_quant.modules.base import model_device
from dist_quant.export.checkpoint import checkpoint_tensors
from dist_quant.parallel.groups import ParallelGroups, default_groups
from dist_quant.quantizer import TensorQuantizer

_QUANTIZER_BUFFER = re.compile(r"^(.*_quantizer)\.(_amax|_global_amax|_block_amax)$")
_FUSED_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class RefitError(ValueError):
    """A streamed tensor has no place in the receiving model."""


def refit_stream(
    model: nn.Module, bridge: ModelBridge, groups: ParallelGroups | None = None, dst: int = 0, quantized: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) on rank `dst`: weights in their own dtype with every quantizer buffer (`*_quantizer._amax`,
    `_global_amax`, `_block_amax`, K/V BMM amax), or, with `quantized`, the real-quantized checkpoint tensors
    (packed NVFP4 / FP8 weights and their scales). TP/EP-gathered one tensor at a time. Collective."""
    groups = groups or default_groups()
    if quantized:
        yield from checkpoint_tensors(model, bridge, groups, dst)
    else:
        yield from export_hf_stream(model, bridge, groups, dst, quant_state=True)


def _fused_expert_slot(state: dict[str, torch.Tensor], name: str) -> torch.Tensor | None:
    """transformers 5 keeps MoE experts fused in memory: gate_up_proj [E, 2I, H] (gate rows first), down_proj
    [E, H, I]. -> the view a per-expert checkpoint tensor lands in."""
    match = _FUSED_EXPERT.match(name)
    if not match:
        return None
    experts, index, projection = match.group(1), int(match.group(2)), match.group(3)
    fused = state.get(f"{experts}.down_proj" if projection == "down_proj" else f"{experts}.gate_up_proj")
    if fused is None:
        return None
    if index >= fused.shape[0]:
        raise RefitError(f"{name}: the receiving model has {fused.shape[0]} experts in {experts}")
    if projection == "down_proj":
        return fused[index]
    half = fused.shape[1] // 2
    return fused[index, :half] if projection == "gate_proj" else fused[index, half:]


def apply_refit(hf_model: nn.Module, stream: Iterable[tuple[str, torch.Tensor]]) -> dict[str, int]:
    """Load a refit stream into a transformers model carrying dist_quant quantizers (`attach_quantizers`), then
    switch its calibrated quantizers to fake quantization. Quantizer state for quantizers the model lacks (e.g.
    K/V BMM on plain attention) is skipped and counted. -> {"loaded": n, "skipped": n}."""
    state = dict(hf_model.state_dict(keep_vars=True))
    modules = dict(hf_model.named_modules())
    device = model_device(hf_model)
    loaded = skipped = 0
    with torch.no_grad():
        for name, tensor in stream:
            target = state.get(name)
            if target is None:
                target = _fused_expert_slot(state, name)
            if target is not None:
                if target.shape != tensor.shape:
                    raise RefitError(f"{name}: streamed shape {tuple(tensor.shape)}, the model has {tuple(target.shape)}")
                target.copy_(tensor)
                loaded += 1
                continue
            match = _QUANTIZER_BUFFER.match(name)
            if match is None:
                raise RefitError(f"{name}: no such parameter or quantizer in the receiving model")
            quantizer = modules.get(match.group(1))
            if not isinstance(quantizer, TensorQuantizer) or not quantizer.enabled:
                skipped += 1
                continue
            quantizer.load_state_dict({match.group(2): tensor}, strict=False)
            quantizer.to(device)
            loaded += 1
    promote(hf_model)
    return {"loaded": loaded, "skipped": skipped}


__all__ = ["RefitError", "apply_refit", "refit_stream"]
