"""The quantization configs of an exported checkpoint (`checkpoint_configs`): the two laid out field for field as
NVIDIA ModelOpt 0.47's exporter writes them (modelopt/torch/export/quant_utils.py `get_quant_config` /
`process_layer_quant_config`, convert_hf_config.py `convert_hf_quant_config_format`), or, for FP8 128x128 blocks
alone, config.json's `quantization_config` in the engines' native `fp8` form (`native_quantization_config`). The
exporter writes them and the verifier expects them from these functions alone; the README's Serving section says
what the engines read in them.

A quantized layer's quant_algo follows from its weight and input formats (`LAYER_ALGOS`): NVFP4 weights with
NVFP4 inputs are "NVFP4" (W4A4), NVFP4 weights with unquantized inputs "W4A16_NVFP4" (ModelOpt's
`get_quantization_format` returns QUANTIZATION_W4A16_NVFP4 when the input quantizer is disabled), FP8 weights
with FP8 inputs "FP8", MXFP8 weights with MXFP8 inputs "MXFP8", FP8 128x128 weight blocks "FP8_PB_WO" whatever
their inputs (both engines quantize such a layer's input themselves, per token in groups of 128). Every other pair
has no form that vLLM 0.33 and SGLang 0.5.23 load (`NO_FORM`).

The native form (a checkpoint whose quantized layers are all FP8 blocks): `{"quant_method": "fp8", "fmt": "e4m3",
"activation_scheme": "dynamic", "weight_block_size": [128, 128], "modules_to_not_convert": [...]}` and
`"kv_cache_quant_algo": "FP8"` with an FP8 KV cache, no hf_quant_config.json: DeepSeek-V3's config, which vLLM 0.33
and SGLang 0.5.23 read with their `Fp8Config.from_config` (both require activation_scheme "dynamic" with blocks;
vLLM ignores fmt and kv_cache_quant_algo, SGLang reads kv_cache_quant_algo to turn its FP8 KV cache on under
`--kv-cache-dtype auto`). modules_to_not_convert names every unquantized linear exactly (vLLM matches it exactly:
`ignored_layers_match_mode = "exact"`, shard by shard for fused layers, experts by substring), MoE routers and a
head tied to the embedding included.

hf_quant_config.json: `{"producer": {name, version}, "quantization": {...}}` with `quant_algo` and
`kv_cache_quant_algo` always; `group_size` (16) for the NVFP4 algos only; `exclude_modules` for one algo; for
MIXED_PRECISION `quantized_layers` (module -> its quant_algo, and group_size for the NVFP4 algos) and no
exclude_modules.

config.json's `quantization_config` (what vLLM and SGLang read first): `quant_method: "modelopt"`, `quant_algo`,
`producer`, `ignore` (the exclude list; [] for MIXED_PRECISION, which lists its `quantized_layers` instead),
`config_groups` (per algo: weights and input activations as {dynamic: false, num_bits, type: float, group_size
for NVFP4}, weights alone for W4A16_NVFP4, targeting "Linear", or the layers of that algo when mixed), and
`kv_cache_scheme` only with a quantized KV cache: {dynamic: false, num_bits: 8, type: float} for FP8 (vLLM turns
the FP8 cache on under `--kv-cache-dtype auto` only when dynamic is false), the string "NVFP4" for NVFP4.
"""

from __future__ import annotations

from dist_quant.formats import FORMATS, FP8, FP8_BLOCK, MXFP4, MXFP8, NVFP4, NumberFormat

GROUP_SIZE = FORMATS[NVFP4].block
W4A16 = "W4A16_NVFP4"
# (weight format, input format or None) -> the layer's quant_algo. W4A16_NVFP4 is ModelOpt's name for
# weight-only NVFP4: vLLM (model_executor/layers/quantization/modelopt.py, LINEAR_ALGOS and resolve) runs it
# with no activation quantization and needs no input_scale (an "NVFP4" layer without one would fold a scale
# that was never loaded: ModelOptNvFp4Config._from_config), SGLang (srt/layers/quantization/modelopt_quant.py,
# ModelOptFp4Config.from_config: is_w4a16) likewise.
# MXFP8 weights and inputs (dynamic blocks, no input_scale) are ModelOpt's "MXFP8", which vLLM 0.33 loads
# (modelopt.py ModelOptMxFp8Config: weight_scale uint8 [out, in/32]) and SGLang 0.5.23 turns into its native mxfp8
# method (model_config.py _parse_modelopt_quant_config).
# FP8 128x128 weight blocks are "FP8_PB_WO" with or without the 1x128 input groups: the engines quantize the input of
# such a layer dynamically in any case (vLLM 0.33 fp8.py Fp8LinearMethod, GroupShape(1, 128); SGLang 0.5.23
# Fp8LinearMethod, which asserts activation_scheme dynamic), and the checkpoint holds nothing of the inputs.
FP8_PB = FORMATS[FP8_BLOCK].algo
LAYER_ALGOS = {
    (NVFP4, NVFP4): "NVFP4", (NVFP4, None): W4A16, (FP8, FP8): "FP8", (MXFP8, MXFP8): "MXFP8",
    (FP8_BLOCK, FP8_BLOCK): FP8_PB, (FP8_BLOCK, None): FP8_PB,
}
QUANT_ALGOS = tuple(dict.fromkeys(LAYER_ALGOS.values()))
MODELOPT_ALGOS = tuple(a for a in QUANT_ALGOS if a != FP8_PB)  # quant_algo of a ModelOpt checkpoint of one format
NVFP4_ALGOS = tuple(algo for (weight, _), algo in LAYER_ALGOS.items() if weight == NVFP4)  # packed, group_size 16


def weight_format(algo: str) -> NumberFormat:
    """The format of a quant_algo's weights."""
    return next(FORMATS[weight] for (weight, _), a in LAYER_ALGOS.items() if a == algo)
MIXED = "MIXED_PRECISION"
KV_ALGOS = ("FP8", "NVFP4")
# Why the other pairs cannot be exported, from the engines' loaders.
NO_FORM = {
    (FP8, None): (
        "FP8 weights with unquantized inputs (weight-only FP8) have no checkpoint form vLLM or SGLang load: their "
        "ModelOpt FP8 layers quantize the input with a stored input_scale and start it at float32's lowest value "
        "when the checkpoint has none (vLLM 0.33 modelopt.py KFp8StaticTensor, SGLang 0.5.23 "
        "ModelOptFp8LinearMethod), and ModelOpt has no weight-only FP8 algo; quantize the inputs to e4m3 as well, "
        "or use NVFP4 weights alone (W4A16_NVFP4, built-in recipe nvfp4_w4a16-fp8_cast_kv)"
    ),
    (NVFP4, FP8): (
        "NVFP4 weights with FP8 inputs (ModelOpt's W4A8_NVFP4_FP8) are not a format vLLM loads (modelopt.py "
        "LINEAR_ALGOS); quantize the inputs to e2m1 or leave them unquantized"
    ),
    (FP8, NVFP4): "FP8 weights with NVFP4 inputs are no ModelOpt format; give weights and inputs one format",
    **dict.fromkeys(((MXFP4, MXFP4), (MXFP4, None)), (
        "MXFP4 has no checkpoint form vLLM 0.33 and SGLang 0.5.23 both load: ModelOpt's (quant_algo mxfp4) is "
        "refused by both (vLLM modelopt.py QUANT_ALGOS, SGLang ModelOptFp8Config), and their native mxfp4 method "
        "takes gpt-oss's own experts only; calibrate and fake-quantize in MXFP4 (QAT), export in NVFP4 or MXFP8"
    )),
    (MXFP8, None): (
        "MXFP8 weights with unquantized inputs have no ModelOpt form (vLLM 0.33 runs MXFP8 layers with MXFP8 "
        "inputs, modelopt.py kMxfp8Dynamic); quantize the inputs to MXFP8 too"
    ),
}


def _input_format(algo: str) -> str | None:
    """The format of a quant_algo's inputs; None: unquantized."""
    return next(inputs for (_, inputs), a in LAYER_ALGOS.items() if a == algo)


def input_quantized(algo: str) -> bool:
    """Whether a layer of this quant_algo quantizes its input with a calibrated scale (and so stores an
    input_scale): MXFP8 inputs are quantized block by block from the data, with none."""
    inputs = _input_format(algo)
    return inputs is not None and FORMATS[inputs].static_inputs


def required_quantization_keys(algo: str) -> tuple[str, ...]:
    """The keys hf_quant_config.json's quantization section holds for this quant_algo."""
    if algo == MIXED:
        return ("quant_algo", "kv_cache_quant_algo", "quantized_layers")
    return ("quant_algo", "kv_cache_quant_algo", *weight_format(algo).config_entries, "exclude_modules")


def layer_entry(algo: str) -> dict:
    """A quantized layer's entry in MIXED_PRECISION's quantized_layers."""
    return {"quant_algo": algo, **weight_format(algo).config_entries}


def hf_quant_config(
    producer: dict, algo: str, kv: str | None, exclude: list[str], layers: dict[str, str] | None = None
) -> dict:
    """hf_quant_config.json. `layers` (module -> its algo) for MIXED_PRECISION."""
    quantization: dict = {"quant_algo": algo, "kv_cache_quant_algo": kv}
    if algo == MIXED:
        quantization["quantized_layers"] = {m: layer_entry(a) for m, a in sorted((layers or {}).items())}
    else:
        quantization |= weight_format(algo).config_entries
        quantization["exclude_modules"] = sorted(exclude)
    return {"producer": producer, "quantization": quantization}


def kv_cache_scheme(algo: str | None) -> dict | str | None:
    """config.json's kv_cache_scheme for a kv_cache_quant_algo; None: no such key."""
    if algo == "FP8":
        return {"dynamic": False, "num_bits": 8, "type": "float"}
    return algo


def _group(algo: str, targets: list[str]) -> dict:
    """A config group (convert_hf_config.py `_quant_algo_to_group_config`): W4A16_NVFP4 has weights alone, which
    vLLM reads as weight-only NVFP4 even under quant_algo NVFP4 (modelopt.py ModelOptNvFp4Config._from_config); an
    algo ModelOpt has no group for (FP8_PB_WO) is its quant_algo alone (its fallback branch)."""
    number = weight_format(algo)
    if not number.config_group:
        return {"quant_algo": algo, "targets": targets}
    tensors = {"dynamic": False, "num_bits": number.config_bits, "type": "float", **number.config_entries}
    inputs = {"input_activations": dict(tensors)} if _input_format(algo) is not None else {}
    return {**inputs, "weights": dict(tensors), "targets": targets}


def quantization_config(hf_quant: dict) -> dict:
    """config.json's quantization_config for an hf_quant_config.json (whose quantization section is sound)."""
    q = hf_quant["quantization"]
    algo = q["quant_algo"]
    if algo == MIXED:
        by_algo: dict[str, list[str]] = {}
        for module, entry in sorted(q["quantized_layers"].items()):
            by_algo.setdefault(entry["quant_algo"], []).append(module)
        groups = {f"group_{i}": _group(a, names) for i, (a, names) in enumerate(sorted(by_algo.items()))}
        listing = {"ignore": [], "quantized_layers": q["quantized_layers"]}
    else:
        groups = {"group_0": _group(algo, ["Linear"])} if weight_format(algo).config_groups else None
        listing = {"ignore": q["exclude_modules"]}
    config = {**({"config_groups": groups} if groups else {}), **listing, "quant_algo": algo, "producer": hf_quant["producer"], "quant_method": "modelopt"}
    scheme = kv_cache_scheme(q["kv_cache_quant_algo"])
    if scheme is not None:
        config["kv_cache_scheme"] = scheme
    return config


# The native form's fixed keys (DeepSeek-V3's quantization_config)
NATIVE = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}


def native_quantization_config(kv: str | None, exclude: list[str]) -> dict:
    """config.json's quantization_config of an FP8 128x128 block checkpoint in the engines' native form (above)."""
    config = {**NATIVE, "weight_block_size": list(FORMATS[FP8_BLOCK].weight_block), "modules_to_not_convert": sorted(exclude)}
    if kv is not None:
        config["kv_cache_quant_algo"] = kv
    return config


def checkpoint_configs(
    producer: dict, algo: str, kv: str | None, exclude: list[str], layers: dict[str, str] | None = None
) -> tuple[dict | None, dict]:
    """(hf_quant_config.json, None for the native form; config.json's quantization_config) of a checkpoint whose
    quantized layers are all `algo` (or MIXED_PRECISION with `layers`), `kv` its kv_cache_quant_algo, `exclude` its
    unquantized linears."""
    if algo == FP8_PB:
        return None, native_quantization_config(kv, exclude)
    hf_quant = hf_quant_config(producer, algo, kv, exclude, layers)
    return hf_quant, quantization_config(hf_quant)
