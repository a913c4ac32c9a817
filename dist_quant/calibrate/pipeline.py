"""The calibration driver: fixed stages over a model, listed in `calibrate`.

attach quantizers from the recipe -> bind every amax into per-domain flat buffers -> collect activation
statistics over the user's forward loop -> calibrate weights from the weights -> reduce across ranks ->
bootstrap experts that received no tokens -> one global amax per group of siblings (shared states) -> MSE
sweep of static NVFP4 block scales (method mse) -> promote every enabled quantizer to fake quantization.

Everything that can fail on one rank only (NaN data, an unseen quantizer) is decided after a collective, so
all ranks raise together instead of leaving others waiting.
"""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from dist_quant.calibrate.shared import form_shared_states
from dist_quant.kernels import nvfp4_mse_block_amax
from dist_quant.modules import QuantModule, convert_linear
from dist_quant.modules.base import model_device, quant_modules, quantizers, structure_changed
from dist_quant.modules.fused_experts import QuantFusedExperts, checkpoint_names, convert_fused_experts, is_fused_experts
from dist_quant.modules.linear import LINEAR_QUANTIZERS
from dist_quant.parallel.groups import ParallelGroups, default_groups, megatron_loaded
from dist_quant.parallel.reduce import AmaxReducer, NonFiniteAmaxError
from dist_quant.formats import STATIC, QuantFormat
from dist_quant.quantizer import QuantizerMode, TensorQuantizer, finish_calibrations
from dist_quant.recipe import Recipe, RecipeError

ForwardLoop = Callable[[nn.Module], None]
# an expert's number in a logical name: megatron's local_experts.E, transformers' fused experts.E (sibling experts
# are the names without it)
_EXPERT_INDEX = re.compile(r"\.(?:local_)?experts\.\d+\.")


class CalibrationError(RuntimeError):
    """Calibration cannot produce a usable amax for some quantizers."""


def _name_list(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _megatron_kinds() -> dict:
    from dist_quant.modules.megatron import megatron_layer_kinds

    return megatron_layer_kinds() if megatron_loaded() else {}


def model_groups(model: nn.Module, groups: ParallelGroups | None = None) -> ParallelGroups:
    """The groups a model's amax are reduced over: the caller's; else megatron's, for a model with megatron layers;
    else none: a plain torch model (a transformers model, on one rank or a copy on each) is the rank's alone, and
    quantizing it never starts a collective."""
    if groups is not None:
        return groups
    kinds = tuple(_megatron_kinds())
    if kinds and any(isinstance(module, kinds) for module in model.modules()):
        return default_groups()
    return ParallelGroups(alone=True)


def attach_quantizers(model: nn.Module, recipe: Recipe, groups: ParallelGroups | None = None) -> int:
    """Convert every quantizable layer (megatron parallel linears and core attention, nn.Linear) in place,
    configured by the recipe, with its quantizers on the model's device; routed megatron experts apply their
    routing weight after linear_fc2 from here on (see RoutedExpertMLP). -> number of enabled quantizers."""
    from dist_quant.modules.megatron import (
        convert_megatron_module,
        layout_for,
        logical_namer,
        quantize_latent_caches,
        route_after_fc2,
    )

    groups = model_groups(model, groups)
    kinds = _megatron_kinds()
    if kinds:
        route_after_fc2(model)
    logical_name = logical_namer(model, groups.rank("ep"))
    device = model_device(model)
    # megatron's output layer tied to the embedding: no weight of its own, or (on a last pipeline stage) a copy
    tied_head = getattr(model, "output_layer", None) if getattr(model, "share_embeddings_and_output_weights", False) else None
    fused_names = checkpoint_names(model)
    enabled = 0

    def formats_for(name: str, module: nn.Module, quantizer_names=LINEAR_QUANTIZERS, weight=None, tied=False) -> dict:
        """The recipe's formats for the named layer's quantizers, checked against its weight (`weight`, else
        the module's own, if any)."""
        nonlocal enabled
        prefix = f"{name}." if name else ""
        formats = {q: recipe.format_for(prefix + q) for q in quantizer_names}
        weight = module._parameters.get("weight") if weight is None else weight
        problem = _format_problem(weight, formats, tied, getattr(getattr(module, "config", None), "kv_channels", None))
        if problem:
            raise RecipeError(f"recipe {recipe.source}: {prefix}{problem}")
        enabled += sum(fmt is not None for fmt in formats.values())
        return formats

    try:
        for name, module in list(model.named_modules()):
            if isinstance(module, (QuantModule, QuantFusedExperts)):
                continue
            if fused_names is not None and is_fused_experts(module):
                convert_fused_experts(module, fused_names, lambda slot, weight: formats_for(slot, module, weight=weight), name)
                continue
            kind = next((k for k in kinds if isinstance(module, k)), None)
            if kind is None and not isinstance(module, nn.Linear):
                continue
            prefix = f"{name}." if name else ""
            formats = formats_for(name, module, kinds[kind][1] if kind else LINEAR_QUANTIZERS, tied=module is tied_head)
            shared_input = recipe.algorithm.expert_inputs == "shared" and ".local_experts." in name
            if shared_input and formats.get("input_quantizer") is not None and not formats["input_quantizer"].number.global_scale:
                raise RecipeError(
                    f"recipe {recipe.source}: algorithm.expert_inputs: shared gives NVFP4 expert inputs one global "
                    f"amax; {prefix}input_quantizer is {formats['input_quantizer'].describe()}"
                )
            if kind is None:
                convert_linear(module, formats, name)
            else:
                convert_megatron_module(module, kinds[kind][0], formats, layout_for(module, logical_name(name)), device)
    finally:  # even a recipe error midway leaves some layers converted
        structure_changed(model)
    if enabled == 0:
        raise RecipeError(f"recipe {recipe.source} enables no quantizer in this model")
    if kinds:
        try:
            quantize_latent_caches(model)
        except ValueError as error:
            raise RecipeError(f"recipe {recipe.source}: {error}") from None
    return enabled


def _format_problem(
    weight: torch.Tensor | None, formats: dict[str, QuantFormat | None], tied: bool, kv_channels: int | None
) -> str | None:
    """Why a layer (its weight, or K/V BMM quantizers over heads of `kv_channels`) cannot take these formats
    (`<quantizer>: reason`); None when it can."""
    if (tied or "weight_quantizer" in formats and weight is None) and any(formats.values()):
        return "*: this layer shares the embedding's weight (tied embeddings), which a checkpoint cannot hold quantized; disable its quantizers"
    # the last dimensions each quantizer sees: a block-scaled format's blocks run along them
    if weight is not None:
        dims = {"weight_quantizer": tuple(weight.shape), "input_quantizer": (weight.shape[-1],), "output_quantizer": (weight.shape[0],)}
    else:
        dims = dict.fromkeys(formats, (kv_channels,))
    for q, fmt in formats.items():
        if fmt is None:
            continue
        if q != "weight_quantizer" and (fmt.block_type == STATIC or fmt.axis is not None):
            return f"{q}: static NVFP4 blocks and per-channel axes apply to weights only"
        multiple = fmt.number.multiple(fmt)
        if multiple is None or dims.get(q) is None or dims[q][0] is None:
            continue
        if len(multiple) > len(dims[q]):
            return f"{q}: {fmt.describe()} applies to weights only"
        seen = dims[q][-len(multiple):]
        if any(n % m for n, m in zip(seen, multiple)):
            need, got = "x".join(map(str, multiple)), "x".join(map(str, seen))
            what = "a last dimension that is a multiple" if len(multiple) == 1 else "last dimensions that are multiples"
            return f"{q}: {fmt.number.algo} needs {what} of {need}; this layer's is {got}"
    return None


def _reduction_domain(module: QuantModule, is_weight: bool, axis: int | None) -> str | None:
    """docs/sync.md: activations over data and tensor parallel ranks; a weight amax over the ranks holding
    its pieces, unless each rank owns its channels whole (per-channel along the sharded dim)."""
    layout = module.layout
    if not is_weight:
        return "edp+etp" if layout.expert else "dp+tp"
    if layout.shard_dim is None or axis == layout.shard_dim:
        return None
    return layout.shard_group


def bind_amax(model: nn.Module, groups: ParallelGroups, device: torch.device | str) -> AmaxReducer:
    """Register every calibrated amax under its logical key and domain; make them views of flat buffers."""
    reducer = AmaxReducer(groups, device)
    for _, module in quant_modules(model):
        weights = {id(q): w for q, w in module.weight_quantizers()}
        for attr, q in module.named_children():
            if not isinstance(q, TensorQuantizer) or q.calibrator is None:
                continue
            weight = weights.get(id(q))
            axis = q.fmt.axis % weight.dim() if weight is not None and q.fmt.axis is not None else None
            shape = q.buffer_shape("_amax", weight)
            domain = _reduction_domain(module, weight is not None, axis)
            reducer.register(domain, f"{module.layout.logical_name}.{attr}", shape, q.bind_amax)
    reducer.allocate()
    return reducer


def collect_statistics(model: nn.Module, forward_loop: ForwardLoop | None) -> None:
    """Run the forward loop with activation quantizers collecting amax; weights are left alone."""
    weight_ids = {id(q) for _, m in quant_modules(model) for q, _ in m.weight_quantizers()}
    to_calibrate = [
        (name, q) for name, q in quantizers(model) if q.calibrator is not None and id(q) not in weight_ids
    ]
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
    finish_calibrations([q for _, q in to_calibrate])
    for _, q in to_calibrate:
        q.mode = QuantizerMode.DISABLED


def _weight_quantizers(model: nn.Module) -> list[tuple[TensorQuantizer, torch.Tensor]]:
    """Every (weight quantizer, its weight) of the model. The pairs are made anew (the modules are listed once per
    change of quantizers, `quant_modules`), since a weight may be a view (an expert's rows of transformers' fused
    parameter) that moving the model leaves behind on the old storage."""
    return [pair for _, module in quant_modules(model) for pair in module.weight_quantizers()]


def weights_by_quantizer(model: nn.Module) -> dict[int, torch.Tensor]:
    """id(weight quantizer) -> the weight it quantizes (what a buffer's expected shape depends on)."""
    return {id(quantizer): weight for quantizer, weight in _weight_quantizers(model)}


def _is_scalar(amax: torch.Tensor | None) -> bool:
    return amax is not None and amax.dim() == 0


def calibrate_weights(model: nn.Module) -> None:
    """Weight amax straight from the weights: no forward pass, so also right after a training step. Per-tensor
    max amax (the common case) come from one multi-tensor max pass over all weights and land in their amax
    buffers in one multi-tensor copy; per-channel and static-block amax weight by weight."""
    together, amax = [], []
    with torch.no_grad():
        for quantizer, weight in _weight_quantizers(model):
            if quantizer.calibrator is None:
                continue
            fmt = quantizer.fmt
            if fmt.axis is None and fmt.block_type != STATIC and weight.numel() and _is_scalar(quantizer._amax):
                together.append(weight)
                amax.append(quantizer._amax)
                quantizer.saw_data = True
            else:
                quantizer.calibrate_from(weight)
        if together:  # max |w| exactly: the same value vector_norm gives per tensor
            torch._foreach_copy_(amax, torch._foreach_norm(together, float("inf"), dtype=torch.float32))


def reduce_amax(reducer: AmaxReducer) -> None:
    try:
        reducer.sync()
    except NonFiniteAmaxError as error:
        raise CalibrationError(str(error)) from None


def _activation_quantizers(model: nn.Module) -> Iterator[tuple[QuantModule, str, TensorQuantizer]]:
    for _, module in quant_modules(model):
        weight_ids = {id(q) for q, _ in module.weight_quantizers()}
        for attr, q in module.named_children():
            if isinstance(q, TensorQuantizer) and q.calibrator is not None and id(q) not in weight_ids:
                yield module, attr, q


def bootstrap_unseen(model: nn.Module, groups: ParallelGroups) -> int:
    """Activation amax still 0 after the reduction saw no data anywhere. An expert that received no tokens gets
    the max of its sibling experts (same layer and linear, across EP); anything else is an error.
    -> number of bootstrapped expert quantizers on this rank."""
    entries = [(f"{m.layout.logical_name}.{attr}", m.layout.expert, q) for m, attr, q in _activation_quantizers(model)]
    if not entries:
        return 0
    seen = (torch.stack([q._amax.reshape(()) for _, _, q in entries]) > 0).tolist()  # one device sync
    unseen = [(key, q.saw_data) for (key, expert, q), ok in zip(entries, seen) if not expert and not ok]
    zeros = [key for key, saw in unseen if saw]
    if zeros:
        raise CalibrationError(
            f"{len(zeros)} activation quantizers saw only zeros: {_name_list(zeros)}; an amax of 0 scales nothing "
            "(are the data or the layers before them zero, or overflowing?)"
        )
    if unseen:
        raise CalibrationError(
            f"{len(unseen)} activation quantizers saw no calibration data on any rank: "
            f"{_name_list([key for key, _ in unseen])}; does forward_loop run every quantized module?"
        )
    siblings: dict[str, list[tuple[TensorQuantizer, bool]]] = {}
    for (key, expert, q), ok in zip(entries, seen):
        if expert:
            siblings.setdefault(_EXPERT_INDEX.sub(".", key), []).append((q, ok))
    if not siblings:
        return 0
    reducer = AmaxReducer(groups, entries[0][2]._amax.device)
    for role, members in siblings.items():
        reducer.register("ep", role, torch.Size([]), lambda view, m=members: view.copy_(torch.stack([q._amax for q, _ in m]).max()))
    reducer.allocate()
    reducer.sync(check_finite=False)
    layer_max = reducer.values(reducer.arenas["ep"])
    positive = dict(zip(layer_max, (torch.stack(list(layer_max.values())) > 0).tolist()))
    empty = [role for role in siblings if not positive[role]]
    if empty:  # the same on every rank: tell zeros from no tokens at all, over the experts' ranks
        saw = torch.tensor([float(any(q.saw_data for q, _ in siblings[empty[0]]))], device=layer_max[empty[0]].device)
        if groups.domains["ep"] is not None:
            dist.all_reduce(saw, op=dist.ReduceOp.MAX, group=groups.domains["ep"])
        if saw.item() > 0:
            raise CalibrationError(
                f"every expert of {empty[0]} saw only zeros: an amax of 0 scales nothing (are the layers before "
                "them zero, or overflowing?)"
            )
        raise CalibrationError(
            f"no expert of {empty[0]} received any calibration token (are the router's inputs and weights finite?)"
        )
    dead = []
    for role, members in siblings.items():
        for q, ok in members:
            if not ok:
                q._amax.copy_(layer_max[role])
                dead.append(q)
    if dead and groups.rank("etp") == 0 and groups.rank("edp") == 0:
        warnings.warn(
            f"{len(dead)} expert activation quantizers on this rank received no calibration tokens; their amax "
            "was bootstrapped from the max of their sibling experts (use more calibration data)",
            stacklevel=2,
        )
    return len(dead)


def sweep_block_scales(model: nn.Module) -> int:
    """MSE stage: every static NVFP4 weight quantizer (dead experts' too) gets the per-block amax of the FP8
    scale sweep under its final, possibly shared, global amax. Weight by weight, no model-sized buffers.
    -> number of weights swept."""
    swept = 0
    with torch.no_grad():
        for _, module in quant_modules(model):
            for quantizer, weight in module.weight_quantizers():
                if quantizer.enabled and quantizer.fmt.block_type == STATIC:
                    quantizer._block_amax = nvfp4_mse_block_amax(weight, quantizer.global_amax)
                    swept += 1
    return swept


def _calibration(model: nn.Module) -> tuple[AmaxReducer, Recipe, ParallelGroups]:
    calibration = getattr(model, "_dist_quant_calibration", None)
    if calibration is None:
        raise ValueError("this model was not calibrated by dist_quant")
    return calibration


def amax_reducer(model: nn.Module) -> AmaxReducer:
    """The flat amax buffers of a calibrated model: `amax_reducer(model).sync()` re-reduces them."""
    return _calibration(model)[0]


def cache_fake_quant_weights(model: nn.Module, enabled: bool = True) -> None:
    """Inference with fake quantization: keep each fake-quantized weight until the weight or its amax change,
    instead of recomputing it every forward. Costs one more copy of the quantized weights in memory; training
    (grad enabled) always recomputes."""
    for _, module in quant_modules(model):
        for quantizer, _ in module.weight_quantizers():
            quantizer.cache_output = enabled
            quantizer._cache = None


@contextmanager
def logits_discarded(model: nn.Module):
    """For forward passes whose logits nobody reads (a calibration loop that only collects statistics): the
    model's output layer sees its input (its input quantizer collects as usual) but computes no product and
    returns an empty tensor. The logits are the largest activation (tokens x vocabulary: 5 GB for 8 x 2048
    tokens over 152k), for nothing. An output layer with an enabled output quantizer still computes."""
    from dist_quant.modules.megatron import QuantParallelLinear

    head = getattr(model, "output_layer", None)
    if not isinstance(head, QuantParallelLinear) or head.output_quantizer.enabled:
        yield
        return
    head.discard_output = True
    try:
        yield
    finally:
        del head.discard_output


def promote(model: nn.Module) -> None:
    for _, q in quantizers(model):
        q.mode = QuantizerMode.QUANTIZING if q.enabled else QuantizerMode.DISABLED


def calibrate(
    model: nn.Module,
    recipe: Recipe,
    forward_loop: ForwardLoop | None = None,
    groups: ParallelGroups | None = None,
    distributed_sync: bool = True,
) -> nn.Module:
    """Calibrate a model whose quantizers are attached, then switch it to fake quantization. With
    `distributed_sync`, amax are reduced over `groups` (megatron's by default); collective: every rank calls."""
    groups = model_groups(model, groups) if distributed_sync else ParallelGroups(alone=True)
    reducer = bind_amax(model, groups, model_device(model))
    model._dist_quant_calibration = (reducer, recipe, groups)
    collect_statistics(model, forward_loop)
    calibrate_weights(model)
    reduce_amax(reducer)
    bootstrap_unseen(model, groups)
    _finish_weights(model, recipe, groups)
    promote(model)
    return model


def _finish_weights(model: nn.Module, recipe: Recipe, groups: ParallelGroups) -> None:
    form_shared_states(model, recipe.algorithm, groups)
    if recipe.algorithm.method == "mse":
        sweep_block_scales(model)


def recalibrate_weights(model: nn.Module) -> None:
    """After a training step changed the weights: weight amax from the weights again, reduced across ranks,
    shared states and MSE block scales redone; activation amax stay. No forward pass. Collective."""
    reducer, recipe, groups = _calibration(model)
    calibrate_weights(model)
    reduce_amax(reducer)
    _finish_weights(model, recipe, groups)
