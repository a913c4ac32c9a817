"""What every quantized wrapper provides to the calibration driver."""

from __future__ import annotations

from typing import Iterator

import torch

from dist_quant.quantizer import TensorQuantizer


class QuantModule:
    """Mixin for quantized layers. `weight_quantizers` pairs each weight quantizer with the tensor it
    quantizes, so weights can be calibrated straight from the weights, without a forward pass."""

    def weight_quantizers(self) -> Iterator[tuple[TensorQuantizer, torch.Tensor]]:
        raise NotImplementedError
