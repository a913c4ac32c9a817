"""nn.Linear (and subclasses) with input, weight and output quantizers, converted in place."""

from __future__ import annotations

from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from dist_quant.modules.base import Layout, QuantModule, quantized_class
from dist_quant.formats import QuantFormat
from dist_quant.quantizer import TensorQuantizer

LINEAR_QUANTIZERS = ("input_quantizer", "weight_quantizer", "output_quantizer")


class QuantLinear(QuantModule):
    """Mixed into the module's own Linear class, so isinstance checks and extra methods keep working."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)
        return self.output_quantizer(y)

    def weight_quantizers(self) -> Iterator[tuple[TensorQuantizer, torch.Tensor]]:
        yield self.weight_quantizer, self.weight


def convert_linear(module: nn.Linear, formats: Mapping[str, QuantFormat | None], name: str) -> nn.Linear:
    """Turn `module` into a quantized linear in place: parameters, hooks and state_dict keys stay; quantizers
    live on the weight's device. A plain linear is whole on every rank: its layout is replicated."""
    module.__class__ = quantized_class(type(module), QuantLinear)
    module.layout = Layout(name)
    for name in LINEAR_QUANTIZERS:
        module.add_module(name, TensorQuantizer(formats.get(name)).to(module.weight.device))
    return module
