"""The public surface."""

from __future__ import annotations

import os

from torch import nn

from dist_quant.calibrate import ForwardLoop, attach_quantizers, calibrate
from dist_quant.calibrate.pipeline import model_groups
from dist_quant.parallel.groups import ParallelGroups
from dist_quant.parallel.agree import first_error, with_rank
from dist_quant.recipe import Recipe, RecipeError, load_recipe


def quantize(
    model: nn.Module,
    recipe: str | os.PathLike | dict | Recipe,
    forward_loop: ForwardLoop | None = None,
    groups: ParallelGroups | None = None,
    distributed_sync: bool = True,
) -> nn.Module:
    """Attach quantizers by recipe, calibrate (activations over `forward_loop(model)`, weights from the
    weights), and switch the model to fake quantization. The model is changed in place and returned.

    `recipe`: a built-in name (see `dist-quant recipes`), a YAML path, parsed YAML data or a Recipe.
    Sharded megatron-core models: call on every rank; amax are reduced over `groups` (by default those of
    megatron's parallel_state) so that the result does not depend on the TP/EP layout.
    """
    recipe = load_recipe(recipe)
    groups = model_groups(model, groups) if distributed_sync else ParallelGroups(alone=True)
    problem = None
    try:
        attach_quantizers(model, recipe, groups)
    except RecipeError as error:
        problem = str(error)
    if not groups.alone:  # a layer only some ranks hold (a pipeline stage's) must stop every rank
        first = first_error(problem)
        problem = with_rank(first) if first else None
    if problem:
        raise RecipeError(problem)
    return calibrate(model, recipe, forward_loop, groups, distributed_sync)
