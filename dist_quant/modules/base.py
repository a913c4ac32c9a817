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
