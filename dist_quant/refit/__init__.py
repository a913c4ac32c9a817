"""Streaming refit: a calibrated sharded Megatron model's weights and quantizer state (or its real-quantized
checkpoint tensors), as Hugging Face tensors, into a live transformers model or an inference engine: one tensor at
a time, one layer at a time, or packed into flat buckets that an engine moves in one copy each."""

from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch
from torch import nn

from dist_quant.bridge.io import export_hf_layers, owned
from dist_quant.bridge.models import ModelBridge
from dist_quant.calibrate.pipeline import promote
from dist_quant.export.buckets import Bucket, bucketed
from dist_quant.export.checkpoint import checkpoint_layers
from dist_quant.modules.base import model_device
from dist_quant.parallel.groups import ParallelGroups, default_groups
from dist_quant.quantizer import TensorQuantizer

_QUANTIZER_BUFFER = re.compile(r"^(.*_quantizer)\.(_amax|_global_amax|_block_amax)$")
_FUSED_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_PART = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}


class RefitError(ValueError):
    """A streamed tensor has no place in the receiving model."""


def refit_layers(
    model: nn.Module, bridge: ModelBridge, groups: ParallelGroups | None = None, dst: int | None = 0,
    quantized: bool = False,
) -> Iterator[tuple[str, list[tuple[str, torch.Tensor]]]]:
    """(layer, [(HF name, tensor), ...]) one layer at a time: see `refit_stream`."""
    groups = groups or default_groups()
    if quantized:
        yield from checkpoint_layers(model, bridge, groups, dst)
        return
    for key, layer in export_hf_layers(model, bridge, groups, dst, quant_state=True):
        yield key, [
            pair for planned, tensor in owned(layer) for pair in zip(planned.hf_names, planned.mapping.to_hf(tensor))
        ]


def refit_stream(
    model: nn.Module, bridge: ModelBridge, groups: ParallelGroups | None = None, dst: int | None = 0,
    quantized: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) on rank `dst`: weights in their own dtype with every quantizer buffer (`*_quantizer._amax`,
    `_global_amax`, `_block_amax`, K/V BMM amax), or, with `quantized`, the real-quantized checkpoint tensors
    (packed NVFP4 / FP8 weights and their scales, quantized a layer at a time on the model's device). `dst` None:
    every rank yields the tensors whose first piece it holds, and nothing is gathered to one rank (an expert
    parallel rank yields its experts). The tensors never alias the model. Collective: every rank exhausts it."""
    for _, tensors in refit_layers(model, bridge, groups, dst, quantized):
        yield from tensors


def refit_buckets(
    model: nn.Module, bridge: ModelBridge, groups: ParallelGroups | None = None, bucket_bytes: int = 1 << 30,
    dst: int | None = None, quantized: bool = False,
) -> Iterator[Bucket]:
    """The refit stream (see `refit_stream`; by default every rank yields its own share) packed into flat buckets
    on the model's device, of at most `bucket_bytes` each (a tensor larger than that gets a bucket of its own), in
    stream order: an engine moves a bucket in one copy or broadcast and takes its tensors as views
    (`Bucket.tensors`, or the table's offsets). Collective."""
    yield from bucketed(refit_stream(model, bridge, groups, dst, quantized), bucket_bytes)


def _in_memory(name: str) -> list[str]:
    """Where a checkpoint name may live in a transformers model: as it is, or (transformers 5 Mixtral) with
    `block_sparse_moe` held as `mlp`."""
    return [name, name.replace(".block_sparse_moe.", ".mlp.")]


def _fused_expert_slot(state: dict[str, torch.Tensor], name: str) -> torch.Tensor | None:
    """transformers 5 keeps MoE experts fused in memory: gate_up_proj [E, 2I, H] (gate rows first: w1, then up:
    w3), down_proj [E, H, I] (w2). -> the view a per-expert checkpoint tensor lands in."""
    for candidate in _in_memory(name):
        match = _FUSED_EXPERT.match(candidate)
        if not match:
            continue
        experts, index, part = match.group(1), int(match.group(2)), _PART[match.group(3)]
        fused = state.get(f"{experts}.down_proj" if part == "down" else f"{experts}.gate_up_proj")
        if fused is None:
            continue
        if index >= fused.shape[0]:
            raise RefitError(f"{name}: the receiving model has {fused.shape[0]} experts in {experts}")
        if part == "down":
            return fused[index]
        half = fused.shape[1] // 2
        return fused[index, :half] if part == "gate" else fused[index, half:]
    return None


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
            target = next((state[n] for n in _in_memory(name) if n in state), None)
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
            quantizer = next((modules[n] for n in _in_memory(match.group(1)) if n in modules), None)
            if not isinstance(quantizer, TensorQuantizer) or not quantizer.enabled:
                skipped += 1
                continue
            quantizer.load_state_dict({match.group(2): tensor}, strict=False)
            quantizer.to(device)
            loaded += 1
    promote(hf_model)
    return {"loaded": loaded, "skipped": skipped}


__all__ = ["Bucket", "RefitError", "apply_refit", "refit_buckets", "refit_layers", "refit_stream"]
