"""What the checkpoint format cannot hold, found from the quantizers' formats alone (docs/checkpoint.md, "What
cannot be exported"): before any model is built, from a recipe and the model's config (`check_exportable`, the
calibrate job's startup check), and by `export_hf` from a quantized model's own quantizers, before it writes.
"""

from __future__ import annotations

import re
from typing import Mapping

from dist_quant.bridge.mappings import ColumnParallelMapping, kv_bmm_mappings
from dist_quant.bridge.models import ModelBridge
from dist_quant.export.configs import LAYER_ALGOS, NO_FORM
from dist_quant.modules.linear import LINEAR_QUANTIZERS
from dist_quant.formats import FP8, QuantFormat
from dist_quant.recipe import Recipe

KV_QUANTIZERS = ("k_bmm_quantizer", "v_bmm_quantizer")
NO_WEIGHTS = (
    "the recipe quantizes no linear weight: the checkpoint format describes quantized weights (for an FP8 KV cache "
    "alone, serve the unquantized model with the engine's FP8 KV cache)"
)
# an MoE layer's routed experts, numbered (a recipe's names) or not ("*": the exporter's logical names)
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.local_experts\.[^.]+\.linear_fc[12]$")
_NUMBER = re.compile(r"[0-9]+")
_NUMBERED_PATTERN = re.compile(r"[0-9?]|\[[^\]]*[-!^0-9]")  # fnmatch syntax that can match a digit on its own


class ExportError(RuntimeError):
    """The model cannot be exported as asked (raised on every rank)."""


def layer_algo(formats: Mapping[str, QuantFormat | None]) -> str | None:
    """A linear's quant_algo from its quantizers' formats; None when its weight is not quantized. Only for
    formats `layer_problem` accepts."""
    weight, inputs = formats.get("weight_quantizer"), formats.get("input_quantizer")
    return None if weight is None else LAYER_ALGOS[weight.kind, inputs.kind if inputs else None]


def layer_problem(formats: Mapping[str, QuantFormat | None]) -> str | None:
    """Why a linear with these quantizer formats has no place in the checkpoint, as '<quantizer>: why'."""
    weight, inputs = formats.get("weight_quantizer"), formats.get("input_quantizer")
    if formats.get("output_quantizer") is not None:
        return (
            "output_quantizer: the checkpoint format has no output scales (ModelOpt exports input and weight "
            "scales; vLLM and SGLang quantize a layer's input and weight only): disable it"
        )
    if weight is None:
        if inputs is None:
            return None
        return "input_quantizer: the input of a layer whose weight stays unquantized has no scale in the checkpoint"
    if weight.axis is not None:
        return (
            f"weight_quantizer: per-channel FP8 weight scales (axis: {weight.axis}) are not part of the checkpoint "
            "format, whose FP8 weights have one scale each (quant_algo FP8)"
        )
    pair = (weight.kind, inputs.kind if inputs else None)
    if pair in LAYER_ALGOS:
        return None
    said = f"{weight.describe()} weights with {inputs.describe() if inputs else 'unquantized'} inputs"
    return f"weight_quantizer / input_quantizer: {NO_FORM.get(pair, said + ' have no checkpoint form dist_quant writes')}"


def _kv_kinds(formats: Mapping[str, QuantFormat | None]) -> tuple[str, str]:
    """A core attention's K and V cache formats ("fp8", "nvfp4" or "unquantized"): what kv_cache_quant_algo says."""
    return tuple(fmt.kind if fmt else "unquantized" for fmt in (formats.get(q) for q in KV_QUANTIZERS))


# The quant_algos a MIXED_PRECISION checkpoint holds in a form both engines load: MXFP8 layers there take their scales
# as weight_scale in vLLM 0.33 (modelopt.py, ModelOptMixedPrecisionConfig) but as weight_scale_inv in SGLang 0.5.23
# (whose mixed path, unlike its mxfp8 method, does not rename them: modelopt_quant.py / loader.py), and vLLM refuses
# tensors it does not expect, so no one checkpoint serves both.
MIXED_ALGOS = frozenset(("NVFP4", "W4A16_NVFP4", "FP8"))
NOT_MIXED = (
    "vLLM 0.33 loads MXFP8 layers of a MIXED_PRECISION checkpoint with weight_scale, SGLang 0.5.23 with "
    "weight_scale_inv, so no one checkpoint serves both; quantize the whole model in MXFP8, or mix NVFP4, "
    "W4A16_NVFP4 and FP8"
)
# docs/checkpoint.md, "Multi-latent attention's KV cache"
LATENT_KV = (
    "multi-latent attention caches one row per token, [latent | rope key], under one scale, which serves in both "
    "engines only as 1.0 (SGLang 0.5.23's default MLA backends write the cache unscaled and read it scaled): "
    "give K and V a cast FP8 entry (use_constant_amax: true), as the *-fp8_cast_kv recipes do"
)


def _latent_kv_problem(formats: Mapping[str, QuantFormat | None]) -> str | None:
    quantized = [fmt for fmt in (formats.get(q) for q in KV_QUANTIZERS) if fmt is not None]
    if all(fmt.kind == FP8 and fmt.use_constant_amax for fmt in quantized):
        return None
    return LATENT_KV


def quantizer_problem(modules: Mapping[str, Mapping[str, QuantFormat | None]], latent: bool = False) -> str | None:
    """`modules`: every linear and core attention of a model by its megatron name (experts numbered, or as `*`)
    -> its quantizers' formats (None: disabled); `latent`: its attention is multi-latent. -> the first thing the
    checkpoint cannot hold, naming the module, or None."""
    experts: dict[str, tuple[str, str]] = {}  # MoE layer -> (its first expert linear, that one's algo)
    algos: dict[str, str] = {}  # quant_algo -> the first module of it
    kv: tuple[str, tuple[str, str]] | None = None  # (the first core attention, its K and V formats)
    weights = False
    for module, formats in modules.items():
        if any(q in formats for q in KV_QUANTIZERS):
            kinds = _kv_kinds(formats)
            said = "K {}, V {}".format(*kinds)
            if kinds[0] != kinds[1]:
                return f"{module}: {said}: the checkpoint has one KV cache format (kv_cache_quant_algo) for K and V"
            if latent and _latent_kv_problem(formats):
                return f"{module}: {LATENT_KV}"
            kv = kv or (module, kinds)
            if kinds != kv[1]:
                return (
                    f"{module}: {said}, but {kv[0]}: K {kv[1][0]}, V {kv[1][1]}: the engines give every layer's KV "
                    "cache one format"
                )
            continue
        problem = layer_problem(formats)
        if problem:
            return f"{module}.{problem}"
        algo = layer_algo(formats)
        weights = weights or algo is not None
        if algo is not None:
            algos.setdefault(algo, module)
            if len(algos) > 1 and not MIXED_ALGOS.issuperset(algos):
                alone = next(a for a in algos if a not in MIXED_ALGOS)
                return f"{algos[alone]} is {alone} in a checkpoint of several formats: {NOT_MIXED}"
        moe = _EXPERT.match(module)
        if moe:
            algo = algo or "unquantized"
            first, first_algo = experts.setdefault(moe.group(1), (module, algo))
            if algo != first_algo:
                return (
                    f"{module} is {algo}, {first} {first_algo}: vLLM and SGLang run an MoE layer's experts as one "
                    "fused layer of one format (vLLM 0.33 modelopt.py ModelOptMixedPrecisionConfig._resolve_quant_algo "
                    "takes the first expert's; is_layer_excluded excludes all or none)"
                )
    return None if weights else NO_WEIGHTS


def _modules(bridge: ModelBridge) -> dict[str, tuple[str, ...]]:
    """Every megatron module that carries quantizers (`attach_quantizers`), by its name in the model, experts by
    their number -> the quantizers it carries. The linears are the parallel weight mappings but the embedding
    (megatron's VocabParallelEmbedding is no linear) and a head tied to it (no weight of its own: refused at
    attach); each fused-QKV mapping gives its core attention (`kv_bmm_mappings`)."""
    patterns: dict[str, tuple[tuple[str, ...], tuple[int, ...] | None]] = {}
    for mapping in bridge.mappings():
        if isinstance(mapping, ColumnParallelMapping) and mapping.megatron.endswith(".weight") and mapping.exported:
            if not mapping.hf[0].endswith("embed_tokens.weight"):
                patterns[mapping.megatron[: -len(".weight")]] = (LINEAR_QUANTIZERS, mapping.layers)
            for kv in kv_bmm_mappings(mapping):
                patterns[kv.megatron.rsplit(".", 2)[0]] = (KV_QUANTIZERS, mapping.layers)
    layers, experts = range(bridge.config.require("num_hidden_layers")), range(bridge.num_experts)
    out = {}
    for pattern, (quantizers, only) in patterns.items():
        names = [pattern]
        for values in (layers if only is None else only, experts)[: pattern.count("*")]:
            names = [name.replace("*", str(value), 1) for name in names for value in values]
        out.update(dict.fromkeys(names, quantizers))
    return out


def check_exportable(recipe: Recipe, bridge: ModelBridge) -> None:
    """ExportError (one line naming the recipe and the quantizer) when the recipe would quantize the model the
    bridge describes in a way the checkpoint cannot hold: checked before any rank builds the model, so that
    no calibration runs for a checkpoint that cannot be written."""
    # A 30B MoE has 37,000 quantizer names. Where no pattern can tell one number from another (none holds a
    # digit, `?` or a bracket class that may match one: digits then only ever fall into a `*`), names that differ
    # only in their numbers resolve alike, and each such family is resolved once.
    numbered = any(_NUMBERED_PATTERN.search(entry.quantizer_name) for entry in recipe.quant_cfg)
    resolved: dict[str, QuantFormat | None] = {}

    def format_for(name: str) -> QuantFormat | None:
        key = name if numbered else _NUMBER.sub("0", name)
        if key not in resolved:
            resolved[key] = recipe.format_for(name)
        return resolved[key]

    modules = {name: {q: format_for(f"{name}.{q}") for q in quantizers} for name, quantizers in _modules(bridge).items()}
    problem = quantizer_problem(modules, bridge.forward.latent is not None)
    if problem:
        raise ExportError(f"recipe {recipe.source}: {problem}")
