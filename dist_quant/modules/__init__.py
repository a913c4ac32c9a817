"""Quantized wrappers: layers that own TensorQuantizers and say which tensors they quantize."""

from dist_quant.modules.base import QuantModule
from dist_quant.modules.linear import QuantLinear, convert_linear

__all__ = ["QuantLinear", "QuantModule", "convert_linear"]
