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
from dist_quant.calibrate.pipeline import quantizers, weights_by_quantizer
from dist_quant.export.buckets import Bucket, bucketed
from dist_quant.export.checkpoint import checkpoint_layers
from dist_quant.modules.base import model_device
from dist_quant.modules.fused_experts import FUSED_DOWN, FUSED_PARAMETER, checkpoint_names, expert_weight, is_fused_experts
from dist_quant.parallel.groups import ParallelGroups, default_groups
from dist_quant.quantizer import QuantizerMode, TensorQuantizer

_QUANTIZER_BUFFER = re.compile(r"^(.*_quantizer)\.(_amax|_global_amax|_block_amax)$")
# quantizers of the KV cache, which an attention module of transformers does not have
KV_CACHE_QUANTIZERS = ("k_bmm_quantizer", "v_bmm_quantizer")


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


class _Receiver:
    """Where each streamed tensor goes in a transformers model: a parameter or buffer, an expert's rows of a fused
    parameter (dist_quant.modules.fused_experts), or a quantizer's buffer; checked before anything is written."""

    def __init__(self, model: nn.Module):
        names = checkpoint_names(model)
        self.in_memory = names.in_memory if names else (lambda name: name)
        self.modules = dict(model.named_modules())
        self.tensors = {n: t for n, t in model.state_dict(keep_vars=True).items() if not _QUANTIZER_BUFFER.match(n)}
        self.parameters = {id(p): n for n, p in model.named_parameters()}
        self.expert_rows: dict[str, tuple[str, torch.Tensor]] = {}  # checkpoint-style name -> (fused name, view)
        for name, module in self.modules.items():
            if names is not None and is_fused_experts(module):
                count = module._parameters[FUSED_DOWN].shape[0]
                for index in range(count):
                    for part, part_name in names.parts:
                        fused = f"{name}.{FUSED_PARAMETER[part]}"
                        self.expert_rows[f"{name}.{index}.{part_name}.weight"] = (fused, expert_weight(module, index, part))
        self.weights = weights_by_quantizer(model)

    def place(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor | TensorQuantizer, str | None]:
        """-> (the receiving tensor's name in memory, the tensor or quantizer, the quantizer buffer or None)."""
        if not tensor.is_floating_point():
            raise RefitError(f"{name}: streamed as {tensor.dtype}; apply_refit takes the plain stream (quantized=False)")
        memory = self.in_memory(name)
        match = _QUANTIZER_BUFFER.match(memory)
        if match:
            return self._place_quantizer_buffer(name, match.group(1), match.group(2), tensor)
        if memory in self.tensors:
            target, key = self.tensors[memory], memory
        elif memory in self.expert_rows:
            key, target = self.expert_rows[memory]
        else:
            raise RefitError(self._missing(name, memory))
        if target.shape != tensor.shape:
            raise RefitError(f"{name}: streamed shape {tuple(tensor.shape)}, the model has {tuple(target.shape)}")
        if not torch.isfinite(tensor).all():
            raise RefitError(f"{name}: NaN or Inf in the streamed tensor")
        return key, target, None

    def _place_quantizer_buffer(self, name: str, quantizer_name: str, buffer: str, tensor: torch.Tensor):
        quantizer = self.modules.get(quantizer_name)
        if quantizer is None and quantizer_name.endswith(KV_CACHE_QUANTIZERS):
            return quantizer_name, None, buffer  # transformers' attention keeps no K/V quantizers: see apply_refit
        if not isinstance(quantizer, TensorQuantizer):
            raise RefitError(f"{name}: the receiving model has no quantizer {quantizer_name} (attach_quantizers first?)")
        if not quantizer.enabled:
            raise RefitError(
                f"{name}: the receiving model's {quantizer_name} is disabled; attach the recipe the stream was calibrated with"
            )
        shape = quantizer.buffer_shape(buffer, self.weights.get(id(quantizer)))
        if shape is None:
            raise RefitError(f"{name}: the receiving {quantizer_name} ({quantizer.fmt.describe()}) keeps no {buffer}")
        if tensor.shape != shape:
            raise RefitError(f"{name}: streamed shape {tuple(tensor.shape)}, the receiving quantizer's is {tuple(shape)}")
        if not (torch.isfinite(tensor).all() and (tensor >= 0).all()):
            raise RefitError(f"{name}: an amax must be finite and not negative (streamed {_extremes(tensor)})")
        return quantizer_name, quantizer, buffer

    def _missing(self, name: str, memory: str) -> str:
        match = re.match(r"^(.*\.experts)\.(\d+)\.", memory)
        experts = self.modules.get(match.group(1)) if match else None
        if experts is not None and is_fused_experts(experts):
            count = experts._parameters[FUSED_DOWN].shape[0]
            return f"{name}: the receiving model has {count} experts in {match.group(1)}"
        return f"{name}: no such parameter or quantizer in the receiving model"

    def unset(self, placed: list[tuple[str, object, str | None]]) -> list[str]:
        """What a complete stream sets and this one left alone: parameters (fused ones wholly, expert by expert)
        and the calibrated buffers of enabled quantizers."""
        given = {(key, buffer) for key, _, buffer in placed}
        rows: dict[str, int] = {}
        for key, target, buffer in placed:
            if buffer is None and key not in self.tensors:  # an expert's rows of a fused parameter
                rows[key] = rows.get(key, 0) + target.numel()
        left = [
            name for name in self.parameters.values()
            if (name, None) not in given and rows.get(name, 0) < self.tensors[name].numel()
        ]
        for name, module in self.modules.items():
            if isinstance(module, TensorQuantizer) and module.enabled and module.calibrator is not None:
                needed = ["_amax"] + (["_block_amax"] if module.buffer_shape("_block_amax", self.weights.get(id(module))) else [])
                left += [f"{name}.{buffer}" for buffer in needed if (name, buffer) not in given]
        return left


def _extremes(tensor: torch.Tensor) -> str:
    return f"{tensor.min().item():g}" if tensor.numel() == 1 else f"min {tensor.min().item():g}, max {tensor.max().item():g}"


def apply_refit(hf_model: nn.Module, stream: Iterable[tuple[str, torch.Tensor]], partial: bool = False) -> dict[str, int]:
    """Load a refit stream (`refit_stream`, not quantized) into a transformers model carrying dist_quant
    quantizers (`attach_quantizers` with the stream's recipe), then switch its calibrated quantizers to fake
    quantization. All or nothing: every streamed tensor is checked first (a place in the model, its shape,
    finite values, amax not negative, the receiving quantizer enabled), and, unless `partial`, the stream must
    set every parameter and every enabled quantizer's amax; any failure raises RefitError with one line and
    leaves the model as it was. The stream is held until then (one copy of the streamed tensors). K/V cache
    amax are the exception: transformers' attention keeps no K/V quantizers (the engine quantizes its KV cache),
    so they are counted and not applied, and a recipe that quantizes the KV cache gives logits that differ by
    that quantization. -> {"loaded": n, "kv_cache_skipped": n}."""
    receiver = _Receiver(hf_model)
    placed, seen = [], set()
    for name, tensor in stream:
        key, target, buffer = receiver.place(name, tensor)
        if (name, buffer) in seen:
            raise RefitError(f"{name}: streamed twice")
        seen.add((name, buffer))
        placed.append((key, target, buffer, tensor))
    if not partial:
        left = receiver.unset([(key, target, buffer) for key, target, buffer, _ in placed])
        if left:
            raise RefitError(
                f"the stream sets {len(placed)} tensors and leaves {len(left)} of the receiving model unset, e.g. "
                f"{left[0]}: a refit is all or nothing (apply_refit(..., partial=True) loads part of a model)"
            )
    device = model_device(hf_model)
    skipped = 0
    with torch.no_grad():
        for _, target, buffer, tensor in placed:
            if buffer is None:
                target.copy_(tensor)
            elif target is None:
                skipped += 1
            else:
                target.load_state_dict({buffer: tensor}, strict=False)
                target.to(device)
    for _, quantizer in quantizers(hf_model):
        quantizer.mode = QuantizerMode.QUANTIZING if quantizer.enabled and quantizer.is_calibrated else QuantizerMode.DISABLED
    return {"loaded": len(placed) - skipped, "kv_cache_skipped": skipped}


__all__ = ["Bucket", "RefitError", "apply_refit", "refit_buckets", "refit_layers", "refit_stream"]
