"""What the checkpoint format cannot hold, found from the quantizers' formats alone (docs/checkpoint.md, "What
cannot be exported"): before any model is built, from a recipe and the model's config (`check_exportable`, the
calibrate job's startup check), and by `export_hf` from a quantized model's own quantizers, before it writes.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

from dist_quant.bridge.mappings import ColumnParallelMapping, QKVMapping, kv_bmm_mappings
from dist_quant.bridge.models import ModelBridge
from dist_quant.export.configs import FP8_PB, LAYER_ALGOS, NO_FORM, NVFP4_ALGOS
from dist_quant.modules.linear import LINEAR_QUANTIZERS
from dist_quant.formats import FORMATS, FP8, FP8_BLOCK, NVFP4, QuantFormat
from dist_quant.recipe import Recipe
from dist_quant.recipe.schema import FUSED_SIBLINGS

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
# tensors it does not expect, so no one checkpoint serves both. FP8 128x128 blocks are there for routed experts
# alone: both engines run FP8_PB_WO experts with their native Fp8MoEMethod (weight_scale_inv, 2-D per expert), but
# FP8_PB_WO linears with vLLM's ModelOpt block method (weight_scale [out/128, 1, in/128, 1]) and SGLang's native
# Fp8LinearMethod (weight_scale_inv [out/128, in/128]).
MIXED_ALGOS = frozenset(("NVFP4", "W4A16_NVFP4", "FP8", FP8_PB))
NOT_MIXED = (
    "vLLM 0.33 loads MXFP8 layers of a MIXED_PRECISION checkpoint with weight_scale, SGLang 0.5.23 with "
    "weight_scale_inv, so no one checkpoint serves both; quantize the whole model in MXFP8, or mix NVFP4, "
    "W4A16_NVFP4, FP8 and FP8 128x128 block experts"
)
FP8_BLOCK_LINEAR_NOT_MIXED = (
    "FP8 128x128 blocks beside other formats (a MIXED_PRECISION checkpoint) are for routed experts only: vLLM 0.33 "
    "loads FP8_PB_WO linear layers there with a 4-D weight_scale [out/128, 1, in/128, 1] (modelopt.py), SGLang "
    "0.5.23 with a 2-D weight_scale_inv (modelopt_quant.py, its native Fp8LinearMethod), so no one checkpoint "
    "serves both; quantize every linear in FP8 blocks (the engines' native fp8 form), or this one in another format"
)
# SGLang 0.5.23 reads MIXED_PRECISION as its modelopt_mixed method only when a layer is NVFP4 or W4A16_NVFP4
# (configs/model_config.py _parse_modelopt_quant_config); otherwise as w4afp8, DeepSeek's int4-expert format
MIXED_WITHOUT_NVFP4 = (
    "SGLang 0.5.23 reads a MIXED_PRECISION checkpoint without an NVFP4 or W4A16_NVFP4 layer as its w4afp8 method "
    "(int4 experts), not as the layers it lists; quantize some layers (the experts) in NVFP4, or the whole model "
    "in one format"
)
# The native fp8 form has one KV cache key, kv_cache_quant_algo, which SGLang 0.5.23's Fp8Config reads for FP8 only
NATIVE_KV = "the native fp8 form of FP8 128x128 blocks holds an FP8 KV cache or none: give K and V e4m3 entries"
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
    block_linear = None  # the first linear (not a routed expert) in FP8 blocks
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
        if algo == FP8_PB and not moe:
            block_linear = block_linear or module
        if moe:
            algo = algo or "unquantized"
            first, first_algo = experts.setdefault(moe.group(1), (module, algo))
            if algo != first_algo:
                return (
                    f"{module} is {algo}, {first} {first_algo}: vLLM and SGLang run an MoE layer's experts as one "
                    "fused layer of one format (vLLM 0.33 modelopt.py ModelOptMixedPrecisionConfig._resolve_quant_algo "
                    "takes the first expert's; is_layer_excluded excludes all or none)"
                )
    if not weights:
        return NO_WEIGHTS
    return _siblings_problem(modules) or _forms_problem(algos, block_linear, kv)


def _siblings_problem(modules: Mapping[str, Mapping[str, QuantFormat | None]]) -> str | None:
    """Separate Megatron linears that the engines fuse into one layer (DeepSeek's q and kv down-projections: vLLM's
    fused_qkv_a_proj) must share one algo, as a fused Megatron linear's modules (q/k/v, gate/up) do by being one."""
    for parent, names in FUSED_SIBLINGS:
        for module in modules:
            head, _, leaf = module.rpartition(".")
            if leaf != names[0] or not re.fullmatch(parent, head):
                continue
            members = [f"{head}.{name}" for name in names if f"{head}.{name}" in modules]
            algos = [layer_algo(modules[m]) or "unquantized" for m in members]
            if len(set(algos)) > 1:
                said = ", ".join(f"{m} {a}" for m, a in zip(members, algos))
                return f"{said}: vLLM 0.33 runs them as one fused layer of one format; give them one"
    return None


def _forms_problem(algos: dict[str, str], block_linear: str | None, kv) -> str | None:
    """What the checkpoint form its quant_algos (-> their first module) take cannot hold: `block_linear`, the first
    FP8-block linear that is no routed expert; `kv`, the first core attention and its K and V formats."""
    if len(algos) > 1 and FP8_PB in algos:
        if block_linear is not None:
            return f"{block_linear} is {FP8_PB}: {FP8_BLOCK_LINEAR_NOT_MIXED}"
        if not set(NVFP4_ALGOS) & set(algos):
            return f"{algos[FP8_PB]} is {FP8_PB} in a checkpoint of several formats: {MIXED_WITHOUT_NVFP4}"
    if set(algos) == {FP8_PB} and kv is not None and kv[1][0] == NVFP4:
        return f"{kv[0]}: K {kv[1][0]}, V {kv[1][1]}: {NATIVE_KV}"
    return None


# FP8 128x128 blocks: Hugging Face modules whose rows the engines need in whole blocks, since they fuse each with the
# next (vLLM 0.33 utils/fp8_utils.py validate_fp8_block_shape: every shard of a merged layer but the last; SGLang
# 0.5.23 fp8.py validate_block_quant_shapes: every shard of q/k/v and gate/up; both engines' Fp8MoEMethod: the
# experts' gate and up rows, "to ensure proper alignment of the block-wise quantization scales")
ROW_BLOCK_MODULES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "w1", "w3", "q_a_proj")
# SGLang 0.5.23's llama.py loader (LlamaForCausalLM, and MistralForCausalLM, which extends it) renames every
# weight_scale_inv to weight_scale (models/llama.py _legacy_load_weights, model_loader/auto_loader.py
# _llama_remap), which its block-FP8 and MXFP8 layers do not have (they register weight_scale_inv; for MXFP8 its
# model_loader/loader.py first renames ModelOpt's weight_scale to weight_scale_inv): the scales are dropped with a
# warning and the layers run with float32's lowest value as every scale (sglang PR #30234)
SGLANG_DROPS_SCALE_INV = ("LlamaForCausalLM", "MistralForCausalLM")
SCALE_INV_ALGOS = (FP8_PB, "MXFP8")  # the quant_algos whose layers SGLang loads scales into as weight_scale_inv


def scale_inv_problem(bridge: ModelBridge, modules: Mapping[str, Mapping[str, QuantFormat | None]]) -> str | None:
    """Why SGLang would load the model's block-FP8 or MXFP8 layers unscaled (its Llama loader), naming the first
    such module; None."""
    if bridge.architecture not in SGLANG_DROPS_SCALE_INV:
        return None
    for module in sorted(modules):
        formats = modules[module]
        algo = None if layer_problem(formats) else layer_algo(formats)
        if algo in SCALE_INV_ALGOS:
            return (
                f"{module} is {algo}: SGLang 0.5.23's {bridge.architecture} loader renames weight_scale_inv, the name "
                f"its {algo} layers load their scales by, to weight_scale and drops them, so they would run unscaled; "
                "export this architecture in FP8 or NVFP4"
            )
    return None
_OUTPUT_LAYER = "output_layer"  # Megatron's head (lm_head)


def block_layout_problem(bridge: ModelBridge, modules: Iterable[str]) -> str | None:
    """`modules`: the Megatron linears (experts numbered or as `*`) whose weights are FP8 128x128 blocks -> the
    first thing about the model that keeps both engines from loading them, or that would make the engines'
    blocks other than the blocks the fake quantization used (Megatron's fused q/k/v rows interleave per query
    group), naming the module; None."""
    modules = sorted(modules)
    if not modules:
        return None
    head = next((m for m in modules if m.startswith(_OUTPUT_LAYER)), None)
    if head is not None:
        return (
            f"{head} is {FP8_PB}: the engines' fp8 method quantizes no output head (ParallelLMHead is no LinearBase its "
            "Fp8Config takes, in vLLM 0.33 and SGLang 0.5.23), so they would load its FP8 values unscaled; disable "
            "its quantizers (*output_layer*)"
        )
    rows = FORMATS[FP8_BLOCK].weight_block[0]
    shapes = bridge.hf_tensor_shapes()
    mappings = [m for m in bridge.mappings() if isinstance(m, ColumnParallelMapping) and m.exported]
    for module in modules:
        name = module.replace("*", "0") + ".weight"
        mapping, wildcards = next(((m, w) for m in mappings for w in [m.match_megatron(name)] if w is not None), (None, None))
        if mapping is None:
            continue
        if isinstance(mapping, QKVMapping) and mapping.head_dim % rows:
            return (
                f"{module}: heads of {mapping.head_dim} channels: Megatron's fused q/k/v weight holds each query "
                f"group's q, k and v rows in turn, so its {rows}-row FP8 blocks (those the fake quantization used) "
                "are not q_proj's, k_proj's and v_proj's own; FP8 128x128 blocks need heads of a multiple of "
                f"{rows} channels"
            )
        for hf_name in mapping.hf_names(wildcards):
            hf_module = hf_name[: -len(".weight")]
            if hf_module.rpartition(".")[2] in ROW_BLOCK_MODULES and shapes[hf_name][0] % rows:
                return (
                    f"{module}: {hf_module} has {shapes[hf_name][0]} rows, no whole number of {rows}-row FP8 blocks, "
                    "which vLLM 0.33 and SGLang 0.5.23 need where they fuse it with its siblings (validate_fp8_block_shape, "
                    "validate_block_quant_shapes, Fp8MoEMethod); quantize it in another format"
                )
    return None


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


def blocks(modules: Mapping[str, Mapping[str, QuantFormat | None]]) -> list[str]:
    """The modules whose weights are FP8 128x128 blocks."""
    return [name for name, formats in modules.items() if layer_algo(formats) == FP8_PB]


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
    problem = (quantizer_problem(modules, bridge.forward.latent is not None) or scale_inv_problem(bridge, modules)
               or block_layout_problem(bridge, blocks(modules)))
    if problem:
        raise ExportError(f"recipe {recipe.source}: {problem}")
