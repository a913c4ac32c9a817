"""The two quantization configs of an exported checkpoint, laid out field for field as NVIDIA ModelOpt 0.47's
exporter writes them (modelopt/torch/export/quant_utils.py `get_quant_config`, convert_hf_config.py
`convert_hf_quant_config_format`). The exporter writes them and the verifier expects them from these functions
alone; the README's Serving section says what the engines read in them.

hf_quant_config.json: `{"producer": {name, version}, "quantization": {...}}` with `quant_algo` and
`kv_cache_quant_algo` always; `group_size` (16) for NVFP4 only; `exclude_modules` for one format; for
MIXED_PRECISION `quantized_layers` (module -> its quant_algo, and group_size for NVFP4) and no exclude_modules.

config.json's `quantization_config` (what vLLM and SGLang read first): `quant_method: "modelopt"`, `quant_algo`,
`producer`, `ignore` (the exclude list; [] for MIXED_PRECISION, which lists its `quantized_layers` instead),
`config_groups` (per format: weights and input activations as {dynamic: false, num_bits, type: float, group_size
for NVFP4}, targeting "Linear", or the layers of that format when mixed), and `kv_cache_scheme` only with a
quantized KV cache: {dynamic: false, num_bits: 8, type: float} for FP8 (vLLM turns the FP8 cache on under
`--kv-cache-dtype auto` only when dynamic is false), the string "NVFP4" for NVFP4.
"""

from __future__ import annotations

GROUP_SIZE = 16
QUANT_ALGOS = ("NVFP4", "FP8")
MIXED = "MIXED_PRECISION"
KV_ALGOS = ("FP8", "NVFP4")


def required_quantization_keys(algo: str) -> tuple[str, ...]:
    """The keys hf_quant_config.json's quantization section holds for this quant_algo."""
    if algo == MIXED:
        return ("quant_algo", "kv_cache_quant_algo", "quantized_layers")
    if algo == "NVFP4":
        return ("quant_algo", "kv_cache_quant_algo", "group_size", "exclude_modules")
    return ("quant_algo", "kv_cache_quant_algo", "exclude_modules")


def layer_entry(algo: str) -> dict:
    """A quantized layer's entry in MIXED_PRECISION's quantized_layers."""
    return {"quant_algo": algo, **({"group_size": GROUP_SIZE} if algo == "NVFP4" else {})}


def hf_quant_config(
    producer: dict, algo: str, kv: str | None, exclude: list[str], layers: dict[str, str] | None = None
) -> dict:
    """hf_quant_config.json. `layers` (module -> its algo) for MIXED_PRECISION."""
    quantization: dict = {"quant_algo": algo, "kv_cache_quant_algo": kv}
    if algo == MIXED:
        quantization["quantized_layers"] = {m: layer_entry(a) for m, a in sorted((layers or {}).items())}
    else:
        if algo == "NVFP4":
            quantization["group_size"] = GROUP_SIZE
        quantization["exclude_modules"] = sorted(exclude)
    return {"producer": producer, "quantization": quantization}


def kv_cache_scheme(algo: str | None) -> dict | str | None:
    """config.json's kv_cache_scheme for a kv_cache_quant_algo; None: no such key."""
    if algo == "FP8":
        return {"dynamic": False, "num_bits": 8, "type": "float"}
    return algo


def _group(algo: str, targets: list[str]) -> dict:
    tensors = {"dynamic": False, "num_bits": 4 if algo == "NVFP4" else 8, "type": "float"}
    if algo == "NVFP4":
        tensors["group_size"] = GROUP_SIZE
    return {"input_activations": dict(tensors), "weights": dict(tensors), "targets": targets}


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
        groups = {"group_0": _group(algo, ["Linear"])}
        listing = {"ignore": q["exclude_modules"]}
    config = {"config_groups": groups, **listing, "quant_algo": algo, "producer": hf_quant["producer"], "quant_method": "modelopt"}
    scheme = kv_cache_scheme(q["kv_cache_quant_algo"])
    if scheme is not None:
        config["kv_cache_scheme"] = scheme
    return config
