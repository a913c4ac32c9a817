"""Megatron <-> Hugging Face: name and tensor mappings, model bridges, quantizer-state mappings, checkpoint I/O."""

from dist_quant.bridge.mappings import BridgeError
from dist_quant.bridge.models import ModelBridge
from dist_quant.bridge.registry import MappingRegistry

__all__ = ["BridgeError", "MappingRegistry", "ModelBridge"]
