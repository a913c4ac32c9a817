"""The loading contracts of the serving engines, as their source states them: what each engine makes of an
exported checkpoint's configs and tensor names. Written from vLLM 0.33.0 and SGLang 0.5.23 (the wheels on PyPI),
each rule with the file and function it comes from. Neither engine runs here (both need a GPU); a loading failure
they would hit at serve time must fail these rules first.
"""

from __future__ import annotations

import re
from fnmatch import fnmatch

# vLLM fuses these checkpoint modules into one layer (its models' packed_modules_mapping)
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


# -- vLLM 0.33.0 --------------------------------------------------------------------------------------------
def vllm_quant_method(qc: dict) -> str | None:
    """vllm/model_executor/layers/quantization/modelopt.py, override_quantization_method: a config.json
    quantization_config with quant_method "modelopt" selects the FP8, NVFP4 or mixed-precision method."""
    if not str(qc.get("quant_method", "")).startswith("modelopt"):
        return None
    return {"FP8": "modelopt", "NVFP4": "modelopt_fp4", "MIXED_PRECISION": "modelopt_mixed"}.get(qc.get("quant_algo"))


def vllm_kv_cache_dtype(qc: dict) -> str:
    """vllm/utils/torch_utils.py, get_kv_cache_quant_algo_string / resolve_kv_cache_dtype_string: what
    `--kv-cache-dtype auto` becomes. A dict turns the FP8 cache on only with dynamic false."""
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


_VLLM_KV = [
    (re.compile(r"\.self_attn\.([kv])_proj\.([kv])_scale$"), r".self_attn.attn.\2_scale"),
    (re.compile(r"\.self_attn\.qkv_proj\.([kv])_scale$"), r".self_attn.attn.\1_scale"),
    (re.compile(r"\.([kv])_scale$"), r".attn.\1_scale"),
]


def vllm_kv_scale_target(name: str) -> str:
    """model_executor/model_loader/weight_utils.py, maybe_remap_kv_scale_name: the attention parameter a
    checkpoint's K/V scale lands in (`...self_attn.attn.k_scale`); a name already a parameter stays."""
    if name.endswith((".attn.k_scale", ".attn.v_scale")):
        return name
    for pattern, replacement in _VLLM_KV:
        if pattern.search(name):
            return pattern.sub(replacement, name)
    return name


# -- SGLang 0.5.23 ------------------------------------------------------------------------------------------
def sglang_quant_method(qc: dict) -> str | None:
    """python/sglang/srt/configs/model_config.py, _parse_quant_hf_config: config.json's quantization_config
    wins; quant_method modelopt becomes modelopt_fp8 / modelopt_fp4 / modelopt_mixed by quant_algo."""
    if qc.get("quant_method") not in ("modelopt", None):
        return None
    return {"FP8": "modelopt_fp8", "NVFP4": "modelopt_fp4", "MIXED_PRECISION": "modelopt_mixed"}.get(qc.get("quant_algo"))


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
    A truthy value makes RadixAttention create k_scale / v_scale parameters (_get_quant_method)."""
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


def sglang_kv_scale_loaded(architecture: str, name: str) -> bool:
    attn_form = bool(re.search(r"\.self_attn\.attn\.[kv]_scale$", name))
    proj_form = bool(re.search(r"\.self_attn\.([kv])_proj\.\1_scale$", name))
    return proj_form if architecture in _SGLANG_REMAPS else attn_form
