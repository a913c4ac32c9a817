"""dist_quant: distributed calibration and export of TP/EP-sharded LLMs in FP8 and NVFP4."""

from dist_quant.api import quantize
from dist_quant.recipe import load_recipe

__version__ = "0.1.0"
__all__ = ["__version__", "load_recipe", "quantize"]
