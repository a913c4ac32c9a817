"""What every quantized wrapper provides to the calibration driver."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from dist_quant.quantizer import TensorQuantizer


@dataclass(frozen=True)
class Layout:
    """Where a module's tensors live. `logical_name`: its name in the unsharded model (global layer and expert
    numbers). `shard_dim`: the weight dim split over `shard_group` ("tp", or "etp" for experts), None if
    replicated. `stride` 2: each rank holds [gate_r; up_r] rather than a contiguous slice (gated MLP fc1)."""

    logical_name: str
    shard_dim: int | None = None
    shard_group: str = "tp"
    stride: int = 1
    expert: bool = False


class QuantModule:
    """Mixin for quantized layers. `weight_quantizers` pairs each weight quantizer with the tensor it
    quantizes, so weights can be calibrated straight from the weights, without a forward pass. `layout` says
    where the module's tensors live."""

    layout: Layout

    def weight_quantizers(self) -> Iterator[tuple[TensorQuantizer, torch.Tensor]]:
        raise NotImplementedError


_quantized_classes: dict[tuple[type, type], type] = {}


def quantized_class(cls: type, mixin: type, prefix: str = "Quant") -> type:
    """`mixin` placed before the module's own class, so isinstance checks and its other methods keep working;
    named `prefix` + the class's name."""
    key = (cls, mixin)
    if key not in _quantized_classes:
        _quantized_classes[key] = type(f"{prefix}{cls.__name__}", (mixin, cls), {})
    return _quantized_classes[key]


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's parameters live: every tensor dist_quant makes for it goes there."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def structure_version(model: torch.nn.Module) -> int:
    """How many times dist_quant changed which quantizers the model has: caches of its tensors (export plans,
    quantizer formats) are keyed by it."""
    return model.__dict__.get("_dist_quant_structure", 0)


_generation = 0  # changes of quantizers in this process, any model's


def structure_changed(model: torch.nn.Module) -> None:
    global _generation
    model.__dict__["_dist_quant_structure"] = structure_version(model) + 1
    _generation += 1


def structure_generation() -> int:
    """How many times dist_quant changed which quantizers any model of this process has: what a module that
    lists quantizers of its submodules (`GroupedExperts`) keys its list by, not knowing its model."""
    return _generation


def quantizers(model: torch.nn.Module) -> Iterator[tuple[str, TensorQuantizer]]:
    """The model's quantizers with their names."""
    return iter(_walk(model)[2])


def quant_modules(model: torch.nn.Module) -> Iterator[tuple[str, QuantModule]]:
    """The model's quantized modules with their names."""
    return iter(_walk(model)[1])


def _walk(model: torch.nn.Module) -> tuple[int, list, list]:
    """(structure generation, the model's quantized modules, its quantizers, both with their names), from one walk
    of its modules per change of quantizers in this process (`structure_generation`): a calibration asks for them
    a dozen times, and each walk of a 30B MoE's 55,000 modules costs a third of a second of host time."""
    cached = model.__dict__.get("_dist_quant_walk")
    if cached is None or cached[0] != _generation:
        modules, found = [], []
        for name, module in model.named_modules():
            if isinstance(module, QuantModule):
                modules.append((name, module))
            elif isinstance(module, TensorQuantizer):
                found.append((name, module))
        cached = model.__dict__["_dist_quant_walk"] = (_generation, modules, found)  # a plain attribute: not state
    return cached
