"""Number formats as objects (docs/formats.md): `FORMATS` by name; each owns its recipe keys, numerics, checkpoint
tensors and sizes (`NumberFormat`); `QuantFormat` is one quantizer's configuration of one."""

from dist_quant.formats.base import DYNAMIC, SCALAR, STATIC, NumberFormat, QuantFormat, Spec
from dist_quant.formats.fp8 import FP8Format
from dist_quant.formats.nvfp4 import NVFP4Format

FORMATS: dict[str, NumberFormat] = {f.name: f for f in (FP8Format(), NVFP4Format())}
FP8, NVFP4 = FP8Format.name, NVFP4Format.name
# num_bits spellings in recipes -> the format
SPELLINGS = {spelling: f for f in FORMATS.values() for spelling in f.spellings}

__all__ = ["DYNAMIC", "FORMATS", "FP8", "NVFP4", "SCALAR", "SPELLINGS", "STATIC", "NumberFormat", "QuantFormat", "Spec"]
