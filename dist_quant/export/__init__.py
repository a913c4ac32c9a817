"""Hugging Face checkpoint writer (ModelOpt unified format, as vLLM loads it) and its verifier."""

from dist_quant.export.checkpoint import estimated_bytes, export_hf
from dist_quant.export.output import OutputError, OutputTarget
from dist_quant.export.problems import ExportError, check_exportable
from dist_quant.export.verify import VerificationError, load_tensors, verify

__all__ = [
    "ExportError", "OutputError", "OutputTarget", "VerificationError", "check_exportable", "estimated_bytes", "export_hf",
    "load_tensors", "verify",
]
