"""Hugging Face checkpoint writer (ModelOpt unified format, as vLLM loads it) and its verifier."""

from dist_quant.export.checkpoint import ExportError, export_hf
from dist_quant.export.verify import VerificationError, load_tensors, verify

__all__ = ["ExportError", "VerificationError", "export_hf", "load_tensors", "verify"]
