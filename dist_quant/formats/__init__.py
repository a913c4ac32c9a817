"""Number formats as objects (docs/formats.md): `FORMATS` by name; each owns its recipe keys, numerics, checkpoint
tensors and sizes (`NumberFormat`); `QuantFormat` is one quantizer's configuration of one."""

from dist_quant.formats.base import DYNAMIC, SCALAR, STATIC, NumberFormat, QuantFormat, Spec
from dist_quant.formats.fp8 import FP8Format
from dist_quant.formats.fp8_blocks import FP8BlockFormat
from dist_quant.formats.mx import MXFP4Format, MXFP8Format
from dist_quant.formats.nvfp4 import NVFP4Format

FORMATS: dict[str, NumberFormat] = {
    f.name: f for f in (FP8Format(), FP8BlockFormat(), MXFP8Format(), NVFP4Format(), MXFP4Format())
}
FP8, NVFP4, MXFP8, MXFP4, FP8_BLOCK = (f.name for f in (FP8Format, NVFP4Format, MXFP8Format, MXFP4Format, FP8BlockFormat))
# the recipe's num_bits values, each format's own
SPELLINGS = tuple(dict.fromkeys(spelling for f in FORMATS.values() for spelling in f.spellings))


def select(num_bits, blocks: dict | None) -> NumberFormat | None:
    """The format a recipe cfg asks for by its num_bits and block_sizes (e4m3: per tensor, in blocks, or MX with
    e8m0 block scales; e2m1: NVFP4, or MX); None for a num_bits no format has."""
    return next((f for f in FORMATS.values() if f.selects(num_bits, blocks)), None)


__all__ = [
    "DYNAMIC", "FORMATS", "FP8", "FP8_BLOCK", "MXFP4", "MXFP8", "NVFP4", "SCALAR", "SPELLINGS", "STATIC", "NumberFormat", "QuantFormat", "Spec", "select",
]
