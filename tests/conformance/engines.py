"""The loading contracts of the serving engines, as their source states them: what each engine makes of an
exported checkpoint's configs and tensor names. Written from vLLM 0.33.0 and SGLang 0.5.23 (the wheels on PyPI),
each rule with the file and function it comes from. Neither engine runs here (both need a GPU); a loading failure
they would hit at serve time must fail these rules first.
"""

from __future__ import annotations

import re
from fnmatch import fnmatch

# vLLM fuses these checkpoint modules into one layer (its models' packed_modules_mapping)
PACKED = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj"),
    # models/deepseek_v2.py: DeepseekV2ForCausalLM's packed_modules_mapping, with a q LoRA
    "fused_qkv_a_proj": ("q_a_proj", "kv_a_proj_with_mqa"),
}


# -- vLLM 0.33.0 --------------------------------------------------------------------------------------------
def vllm_quant_method(qc: dict) -> str | None:
    """vllm/model_executor/layers/quantization/modelopt.py, override_quantization_method of ModelOptFp8Config
    (quant_algo FP8), ModelOptNvFp4Config (any quant_algo holding "NVFP4" or "FP4", W4A16_NVFP4 too) and
    ModelOptMixedPrecisionConfig (MIXED_PRECISION), on a quantization_config with quant_method "modelopt"."""
    if qc.get("quant_method") == "fp8":  # fp8.py Fp8Config, its own method (no override claims the config)
        return "fp8" if fp8_block_config_problem(qc) is None else None
    if not str(qc.get("quant_method", "")).startswith("modelopt"):
        return None
    algo = str(qc.get("quant_algo", "")).upper()
    if algo == "MIXED_PRECISION":
        return "modelopt_mixed"
    if "MXFP8" in algo:  # ModelOptMxFp8Config.override_quantization_method
        return "modelopt_mxfp8"
    return "modelopt_fp4" if "NVFP4" in algo or "FP4" in algo else "modelopt" if algo == "FP8" else None


def fp8_block_config_problem(qc: dict) -> str | None:
    """vLLM 0.33 and SGLang 0.5.23 fp8.py, Fp8Config.from_config and __init__ alike: activation_scheme is required
    (get_from_keys raises without it), a weight_block_size has two sizes and needs the dynamic scheme."""
    if "activation_scheme" not in qc:
        return "activation_scheme is required"
    block = qc.get("weight_block_size")
    if block is not None and (len(block) != 2 or qc["activation_scheme"] != "dynamic"):
        return "The block-wise quantization only supports dynamic activation scheme"
    return None


def vllm_layer_algo(qc: dict, module: str) -> str:
    """The linear algo vLLM runs a quantized checkpoint module with (modelopt.py): MIXED_PRECISION's
    quantized_layers entry (ModelOptMixedPrecisionConfig._resolve_quant_algo); else quant_algo, where
    ModelOptNvFp4Config._from_config turns NVFP4 into W4A16_NVFP4 when every config group's input_activations is
    null (or absent). Under the native fp8 method with a weight_block_size every layer not skipped is block FP8
    (fp8.py Fp8LinearMethod / Fp8MoEMethod with block_quant), here under ModelOpt's name for it."""
    if qc.get("quant_method") == "fp8":
        return "FP8_PB_WO"
    if qc["quant_algo"] == "MIXED_PRECISION":
        return qc["quantized_layers"][module]["quant_algo"].upper()
    groups = qc.get("config_groups")
    if qc["quant_algo"] == "NVFP4" and groups and all(g.get("input_activations") is None for g in groups.values()):
        return "W4A16_NVFP4"
    return qc["quant_algo"]


# The parameters a quantized linear registers per algo, each loaded from the checkpoint tensor of its name; one
# the checkpoint lacks keeps its initial value: FP8's input_scale float32's lowest (FP8_SCALE_SENTINEL), NVFP4's
# torch.empty. modelopt.py resolve() and the QuantKeySchemes' create_weights: FP8 = KFp8StaticTensor as weight
# and activation; NVFP4 = KNvfp4Static + KNvfp4Dynamic; W4A16_NVFP4 = KNvfp4Static alone (_DropInputScale takes
# and drops an input_scale of older exports). ModelOptNvFp4FusedMoE registers input scales for W4A16 experts as
# well, which its a16 kernels never read (use_a16: no activation key).
VLLM_LAYER_PARAMS = {
    "MXFP8": {"weight", "weight_scale"},  # KMxfp8Static: uint8 [out, in/32]; activations kMxfp8Dynamic
    # fp8.py Fp8LinearMethod.create_weights with block_quant: weight fp8 [out, in], weight_scale_inv float32
    # [ceil(out/128), ceil(in/128)] ("The weight_scale_inv name is intentional for deepseekv3"), no input_scale under
    # the dynamic scheme; Fp8MoEMethod: w13_weight_scale_inv / w2_weight_scale_inv from each expert's
    # weight_scale_inv, as in MIXED_PRECISION's FP8_PB_WO experts (Fp8MoEMethod(self.fp8_block_config))
    "FP8_PB_WO": {"weight", "weight_scale_inv"},
    "FP8": {"weight", "weight_scale", "input_scale"},
    "NVFP4": {"weight", "weight_scale", "weight_scale_2", "input_scale"},
    "W4A16_NVFP4": {"weight", "weight_scale", "weight_scale_2"},
}


def vllm_kv_cache_dtype(qc: dict) -> str:
    """vllm/utils/torch_utils.py, get_kv_cache_quant_algo_string / resolve_kv_cache_dtype_string: what
    `--kv-cache-dtype auto` becomes, read from ModelOpt configs only (quant_method starting with "modelopt"). A
    dict turns the FP8 cache on only with dynamic false."""
    if not str(qc.get("quant_method", "")).startswith("modelopt"):
        return "auto"
    scheme = qc.get("kv_cache_scheme", qc.get("kv_cache_quant_algo"))
    if isinstance(scheme, dict):
        if scheme.get("dynamic") is False and scheme.get("num_bits") == 8 and scheme.get("type") == "float":
            return "fp8_e4m3"
        return "nvfp4" if scheme.get("num_bits") == 4 else "auto"
    return {"fp8": "fp8_e4m3", "nvfp4": "nvfp4"}.get(str(scheme).lower(), "auto") if scheme else "auto"


def vllm_nvfp4_required(hf_quant: dict) -> list[str]:
    """modelopt.py, ModelOptNvFp4Config._from_config on hf_quant_config.json's nested format: these keys must be
    present (null passes). -> the missing ones."""
    section = hf_quant.get("quantization", {})
    return [k for k in ("group_size", "kv_cache_quant_algo", "exclude_modules") if k not in section]


def _vllm_one_excluded(prefix: str, patterns: list[str]) -> bool:
    """modelopt.py, is_layer_excluded: exact name, then a substring test, then fnmatch; `foo*` also as `foo` and
    `foo.*` (apply_vllm_mapper)."""
    expanded = [q for p in patterns for q in ([p[:-1].rstrip("."), p[:-1] + ".*", p] if p.endswith("*") else [p])]
    return any(prefix == p or p in prefix or fnmatch(prefix, p) for p in expanded)


def vllm_excluded(prefix: str, patterns: list[str]) -> bool:
    """Whether vLLM leaves the layer `prefix` unquantized. A fused layer (qkv_proj, gate_up_proj) asks for each
    of its shards and refuses shards that disagree (model_executor/layers/quantization/utils/quant_utils.py
    is_layer_skipped: "Detected some but not all shards of ... are quantized")."""
    parent, _, leaf = prefix.rpartition(".")
    if leaf in PACKED:
        answers = {_vllm_one_excluded(f"{parent}.{shard}", patterns) for shard in PACKED[leaf]}
        if len(answers) > 1:
            raise ValueError(f"vLLM: some but not all shards of {prefix} are quantized")
        return answers.pop()
    return _vllm_one_excluded(prefix, patterns)


def vllm_fp8_skipped(prefix: str, ignored: list[str]) -> bool:
    """The native fp8 method (fp8.py Fp8Config.get_quant_method): utils/quant_utils.py is_layer_skipped in "exact"
    mode (ignored_layers_match_mode). A fused layer asks for each shard by exact name and refuses shards that
    disagree; a prefix holding "experts" (the fused MoE) is skipped when it is a substring of an ignored name that
    holds "experts" too; anything else by exact name."""
    parent, _, leaf = prefix.rpartition(".")
    if leaf in PACKED and prefix not in ignored:
        answers = {f"{parent}.{shard}" in ignored for shard in PACKED[leaf]}
        if len(answers) > 1:
            raise ValueError(f"vLLM: some but not all shards of {prefix} are quantized")
        return answers.pop()
    if "experts" in prefix:
        return any(prefix in name for name in ignored if "experts" in name)
    return prefix in ignored


_VLLM_KV = [
    (re.compile(r"\.self_attn\.([kv])_proj\.([kv])_scale$"), r".self_attn.attn.\2_scale"),
    (re.compile(r"\.self_attn\.qkv_proj\.([kv])_scale$"), r".self_attn.attn.\1_scale"),
    (re.compile(r"\.([kv])_scale$"), r".attn.\1_scale"),
]


def vllm_kv_scale_target(name: str, latent: bool = False) -> str:
    """model_executor/model_loader/weight_utils.py, maybe_remap_kv_scale_name: the attention parameter a
    checkpoint's K/V scale lands in (`...self_attn.attn.k_scale`); a name already a parameter stays. `latent`:
    a multi-latent attention model (DeepSeek), whose attention is self_attn.mla_attn.mla_attn (models/deepseek_v2.py,
    layers/mla.py): only the ModelOpt form (self_attn.k_proj.k_scale) is remapped there; the others land on
    self_attn.attn, which such a model lacks (dropped with a warning)."""
    if latent:
        return re.sub(r"\.self_attn\.([kv])_proj\.([kv])_scale$", r".self_attn.mla_attn.mla_attn.\2_scale", name)
    if name.endswith((".attn.k_scale", ".attn.v_scale")):
        return name
    for pattern, replacement in _VLLM_KV:
        if pattern.search(name):
            return pattern.sub(replacement, name)
    return name


# -- SGLang 0.5.23 ------------------------------------------------------------------------------------------
def sglang_quant_method(qc: dict) -> str | None:
    """python/sglang/srt/configs/model_config.py, _parse_quant_hf_config / _parse_modelopt_quant_config:
    config.json's quantization_config wins; quant_method modelopt becomes modelopt_fp4 for a quant_algo holding
    "FP4" or "NVFP4" (W4A16_NVFP4 too), modelopt_fp8 for FP8, and for MIXED_PRECISION modelopt_mixed when a
    quantized layer is NVFP4 or W4A16_NVFP4 (else w4afp8)."""
    if qc.get("quant_method") == "fp8":
        return sglang_native_method(qc)
    if qc.get("quant_method") not in ("modelopt", None):
        return None
    algo = qc.get("quant_algo") or ""
    if algo == "MIXED_PRECISION":
        layers = qc.get("quantized_layers") or {}
        nvfp4 = any(str(e.get("quant_algo", "")).upper() in ("NVFP4", "W4A16_NVFP4") for e in layers.values())
        return "modelopt_mixed" if nvfp4 else "w4afp8"
    if algo == "MXFP8":  # re-parsed as its native mxfp8 method (weight_scale renamed weight_scale_inv on load)
        return "mxfp8"
    return "modelopt_fp4" if "FP4" in algo or "NVFP4" in algo else "modelopt_fp8" if algo == "FP8" else None


def sglang_native_method(qc: dict) -> str | None:
    """configs/model_config.py _parse_quant_hf_config: a quantization_config with quant_method "fp8" is taken as
    it is, by srt/layers/quantization/fp8.py Fp8Config (with the same keys vLLM requires)."""
    return "fp8" if qc.get("quant_method") == "fp8" and fp8_block_config_problem(qc) is None else None


def sglang_fp8_skipped(prefix: str, ignored: list[str]) -> bool:
    """fp8.py Fp8Config.from_config keeps each ignored name with and without its "model." prefix; then
    layers/quantization/utils.py is_layer_skipped: a fused layer (qkv_proj, gate_up_proj: _FALLBACK_FUSED_SHARDS)
    asks for each shard and refuses shards that disagree; a module matches an ignored name equal to it, one it
    starts with (a dotted parent) or one of its dotted runs (_module_path_match); a fused MoE (a prefix holding
    "experts") also when it is a substring of an ignored name holding "experts"."""
    names = [variant for name in ignored for variant in (name.removeprefix("model."), "model." + name.removeprefix("model."))]

    def match(module: str) -> bool:
        return any(module == n or module.startswith(n + ".") or f".{n}." in f".{module}." for n in names)

    parent, _, leaf = prefix.rpartition(".")
    if leaf in ("qkv_proj", "gate_up_proj"):
        answers = {match(f"{parent}.{shard}") for shard in PACKED[leaf]}
        if len(answers) > 1:
            raise ValueError(f"SGLang: some but not all shards of {prefix} are quantized")
        return answers.pop()
    return match(prefix) or ("experts" in prefix and any(prefix in n for n in names if "experts" in n))


def sglang_layer_algo(qc: dict, module: str) -> str:
    """The algo SGLang runs a quantized module with: MIXED_PRECISION's quantized_layers entry
    (srt/layers/quantization/modelopt_quant.py ModelOptMixedPrecisionConfig._resolve_quant_algo), else quant_algo
    as written: ModelOptFp4Config.from_config runs W4A16 only for quant_algo W4A16_NVFP4 (is_w4a16) and, unlike
    vLLM, does not read config_groups for it. The native fp8 method with a weight_block_size: block FP8 (fp8.py
    Fp8LinearMethod / Fp8MoEMethod), under ModelOpt's name for it."""
    if qc.get("quant_method") == "fp8":
        return "FP8_PB_WO"
    if qc["quant_algo"] == "MIXED_PRECISION":
        return qc["quantized_layers"][module]["quant_algo"].upper()
    return qc["quant_algo"]


# modelopt_quant.py create_weights: ModelOptFp8LinearMethod (input_scale starts at float32's lowest),
# ModelOptFp4LinearMethod (input_scale starts at 1.0: an NVFP4 layer without one quantizes its input as if its
# amax were 2688), ModelOptNvFp4A16LinearMethod (an input_scale placeholder only to consume older exports' and
# delete it); ModelOptNvFp4FusedMoEMethod fills missing expert input scales with 1.0 and uses ones for W4A16.
# Its native mxfp8 method (fp8.py Fp8LinearMethod with use_mxfp8) registers the uint8 E8M0 scales as
# weight_scale_inv, which model_loader/loader.py fills from ModelOpt's weight_scale (`sglang_weight_name`).
SGLANG_LAYER_PARAMS = {**VLLM_LAYER_PARAMS, "MXFP8": {"weight", "weight_scale_inv"}}


def sglang_fp4_group_size(qc: dict) -> int | None:
    """srt/layers/quantization/modelopt_quant.py, ModelOptFp4Config.from_config: the top-level group_size, else
    the first config group's weights.group_size (else 16 for NVFP4)."""
    if "group_size" in qc:
        return qc["group_size"]
    groups = qc.get("config_groups") or {}
    first = next(iter(groups.values()), {})
    return (first.get("weights") or {}).get("group_size", 16)


def sglang_kv_cache_algo(qc: dict) -> str | None:
    """modelopt_quant.py, ModelOptFp8Config / ModelOptFp4Config.from_config: a float / 8-bit kv_cache_scheme dict
    is FP8 (any other dict "auto" for FP4); the strings FP8 and NVFP4 are themselves; FP4 defaults to "auto".
    A truthy value makes RadixAttention create k_scale / v_scale parameters (_get_quant_method). The native fp8
    method: fp8.py Fp8Config.from_config reads kv_cache_quant_algo as it is, and mem_cache/kv_cache_dtype.py
    configure_kv_cache_dtype turns "FP8" into an fp8_e4m3 cache under `--kv-cache-dtype auto`."""
    if qc.get("quant_method") == "fp8":
        return qc.get("kv_cache_quant_algo")
    scheme = qc.get("kv_cache_scheme")
    if isinstance(scheme, dict):
        return "FP8" if scheme.get("type") == "float" and scheme.get("num_bits") == 8 else "auto"
    if scheme in ("FP8", "NVFP4"):
        return scheme
    return "auto" if qc.get("quant_algo") == "NVFP4" else None


def sglang_excluded(prefix: str, patterns: list[str]) -> bool:
    """modelopt_quant.py, is_layer_excluded: each pattern as a regex (`.` literal, `*` any run), fully matched
    against the prefix or any of its dotted parts."""
    for pattern in patterns:
        regex = re.compile(re.escape(pattern).replace(r"\*", ".*"))
        if regex.fullmatch(prefix) or any(regex.fullmatch(part) for part in prefix.split(".")):
            return True
    return False


# srt/models/*.py load_weights, per architecture: which checkpoint K/V scale names reach attn.k_scale /
# attn.v_scale. llama.py and qwen3.py (Mistral subclasses llama.py) remap names holding "scale" through
# maybe_remap_kv_scale_name, which turns self_attn.k_proj.k_scale and self_attn.k_scale into
# self_attn.attn.k_scale and drops self_attn.attn.k_scale (no check that it is a parameter already). qwen2.py,
# qwen3_moe.py, glm4_moe.py and mixtral.py do not remap: their stacked-parameter loop renames k_proj to
# qkv_proj (dropped; Mixtral raises KeyError), and only self_attn.attn.k_scale is a parameter as it is.
_SGLANG_REMAPS = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen3ForCausalLM"}
# models/deepseek_common/deepseek_weight_loader.py: a k_scale / v_scale not a parameter has `k_proj` / `v_proj`
# replaced by attn_mqa (self_attn.k_proj.k_scale -> self_attn.attn_mqa.k_scale); other names are skipped
_SGLANG_LATENT = {"DeepseekV3ForCausalLM"}


def sglang_kv_scale_loaded(architecture: str, name: str) -> bool:
    attn_form = bool(re.search(r"\.self_attn\.attn\.[kv]_scale$", name))
    proj_form = bool(re.search(r"\.self_attn\.([kv])_proj\.\1_scale$", name))
    return proj_form if architecture in _SGLANG_REMAPS | _SGLANG_LATENT else attn_form


# srt/models/llama.py LlamaForCausalLM._legacy_load_weights (MistralForCausalLM extends it) and
# model_loader/auto_loader.py _llama_remap (its weight loader v2): every ".weight_scale_inv" is renamed
# ".weight_scale" before it is looked up, and a name that is no parameter is skipped with a warning
_SGLANG_SCALE_INV_RENAMED = {"LlamaForCausalLM", "MistralForCausalLM"}


def sglang_weight_name(architecture: str, name: str, method: str | None = None) -> str:
    """The name SGLang's loader of the architecture looks a checkpoint weight tensor up by, under the quantization
    method `method` (sglang_quant_method): for mxfp8, model_loader/loader.py first renames ".weight_scale" to
    ".weight_scale_inv" (`is_mxfp8`); then the architecture's own renames."""
    if method == "mxfp8" and name.endswith(".weight_scale"):
        name += "_inv"
    if architecture in _SGLANG_SCALE_INV_RENAMED and name.endswith(".weight_scale_inv"):
        return name.removesuffix("_inv")
    return name


def mixed_fp8_block_sizes(qc: dict) -> set[int]:
    """MIXED_PRECISION's block size for FP8_PB_WO / FP8_BLOCK_SCALES layers: vLLM 0.33 modelopt.py and SGLang
    0.5.23 modelopt_quant.py ModelOptMixedPrecisionConfig alike take `int(group_size)` (default 128) and refuse
    layers that disagree; the result is their Fp8Config's weight_block_size."""
    return {int(e.get("group_size", 128)) for e in qc["quantized_layers"].values()
            if str(e.get("quant_algo", "")).upper() in ("FP8_PB_WO", "FP8_BLOCK_SCALES")}
