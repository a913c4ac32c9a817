"""The public surface."""

from __future__ import annotations

import os

from torch import nn

from dist_quant.calibrate import ForwardLoop, attach_quantizers, calibrate
from dist_quant.recipe import Recipe, load_recipe


def quantize(
    model: nn.Module,
    recipe: str | os.PathLike | dict | Recipe,
    forward_loop: ForwardLoop | None = None,
) -> nn.Module:
    """Attach quantizers by recipe, calibrate (activations over `forward_loop(model)`, weights from the
    weights), and switch the model to fake quantization. The model is changed in place and returned.

    `recipe`: a built-in name (see `dist-quant recipes`), a YAML path, parsed YAML data or a Recipe.
    """
    recipe = load_recipe(recipe)
    attach_quantizers(model, recipe)
    return calibrate(model, recipe, forward_loop)
