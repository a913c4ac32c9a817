"""The calibration driver: fixed stages over a model, listed in `calibrate`.

attach quantizers from the recipe -> collect activation statistics over the user's forward loop -> calibrate
weights from the weights themselves -> promote every enabled quantizer to fake quantization.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

from dist_quant.modules import QuantModule, convert_linear
from dist_quant.modules.linear import LINEAR_QUANTIZERS
from dist_quant.quantizer import STATIC, QuantizerMode, TensorQuantizer
from dist_quant.recipe import Recipe, RecipeError

ForwardLoop = Callable[[nn.Module], None]


class CalibrationError(RuntimeError):
    """Calibration cannot produce a usable amax for some quantizers."""


def _name_list(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def quantizers(model: nn.Module) -> Iterator[tuple[str, TensorQuantizer]]:
    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer):
            yield name, module


def _weight_quantizer_ids(model: nn.Module) -> set[int]:
    return {
        id(quantizer)
        for module in model.modules()
        if isinstance(module, QuantModule)
        for quantizer, _ in module.weight_quantizers()
    }


def attach_quantizers(model: nn.Module, recipe: Recipe) -> int:
    """Convert every nn.Linear to a quantized linear configured by the recipe. -> number converted."""
    converted = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or isinstance(module, QuantModule):
            continue
        prefix = f"{name}." if name else ""
        formats = {q: recipe.format_for(prefix + q) for q in LINEAR_QUANTIZERS}
        for q, fmt in formats.items():
            if fmt is not None and fmt.block_type == STATIC and q != "weight_quantizer":
                raise RecipeError(
                    f"recipe {recipe.source}: static NVFP4 blocks apply to weights only, "
                    f"but {prefix + q} would get them"
                )
        convert_linear(module, formats)
        converted += 1
    return converted


def collect_statistics(model: nn.Module, forward_loop: ForwardLoop | None) -> None:
    """Run the forward loop with activation quantizers collecting amax; weights are left alone."""
    weight_ids = _weight_quantizer_ids(model)
    activations = [
        (name, q) for name, q in quantizers(model) if q.enabled and id(q) not in weight_ids
    ]
    to_calibrate = [(name, q) for name, q in activations if q.calibrator is not None]
    if not to_calibrate:
        return
    if forward_loop is None:
        raise CalibrationError(
            f"the recipe quantizes {len(to_calibrate)} activations ({_name_list([n for n, _ in to_calibrate])}): "
            "pass forward_loop to calibrate them"
        )
    for _, q in quantizers(model):
        q.mode = QuantizerMode.DISABLED
    for _, q in to_calibrate:
        q.mode = QuantizerMode.CALIBRATING
    with torch.no_grad():
        forward_loop(model)
    unseen = []
    for name, q in to_calibrate:
        try:
            if not q.finish_calibration():
                unseen.append(name)
        except ValueError as error:
            raise CalibrationError(f"{name}: {error}") from None
        q.mode = QuantizerMode.DISABLED
    if unseen:
        raise CalibrationError(
            f"{len(unseen)} activation quantizers saw no calibration data: {_name_list(unseen)}; "
            "does forward_loop run every quantized module?"
        )


def calibrate_weights(model: nn.Module) -> None:
    """Weight amax straight from the weights: no forward pass, so also right after a training step."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, QuantModule):
                for quantizer, weight in module.weight_quantizers():
                    if quantizer.enabled:
                        quantizer.calibrate_from(weight)


def promote(model: nn.Module) -> None:
    for _, q in quantizers(model):
        q.mode = QuantizerMode.QUANTIZING if q.enabled else QuantizerMode.DISABLED


def calibrate(model: nn.Module, recipe: Recipe, forward_loop: ForwardLoop | None = None) -> nn.Module:
    """Calibrate a model whose quantizers are attached, then switch it to fake quantization."""
    if recipe.algorithm.method != "max":
        raise NotImplementedError(
            f"recipe {recipe.source}: algorithm method {recipe.algorithm.method!r} is not implemented yet "
            "(only 'max')"
        )
    collect_statistics(model, forward_loop)
    calibrate_weights(model)
    promote(model)
    return model
