"""The calibration driver: stages over a model, from attaching quantizers to fake quantization."""

from dist_quant.calibrate.pipeline import (
    ForwardLoop,
    CalibrationError,
    attach_quantizers,
    cache_fake_quant_weights,
    calibrate,
    calibrate_weights,
    collect_statistics,
    logits_discarded,
    promote,
    quantizers,
    recalibrate_weights,
)

__all__ = [
    "CalibrationError",
    "ForwardLoop",
    "attach_quantizers",
    "cache_fake_quant_weights",
    "calibrate",
    "calibrate_weights",
    "collect_statistics",
    "logits_discarded",
    "promote",
    "quantizers",
    "recalibrate_weights",
]
