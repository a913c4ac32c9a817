"""Exports against the serving engines' loading contracts (tests/conformance/engines.py, from vLLM 0.33.0 and
SGLang 0.5.23): for every architecture x {NVFP4, FP8, mixed, NVFP4 weight-only (W4A16), mixed with weight-only
layers, MXFP8, FP8 128x128 blocks (the native fp8 form), mixed with FP8-block experts}, and tied heads, each engine
must detect the method, turn the FP8 KV cache on (vLLM under the native fp8 form only with --kv-cache-dtype fp8),
quantize exactly the layers the checkpoint holds quantized with the algo they were calibrated in, find every
parameter it registers for them under the name its loader looks up, and every K/V scale, and find the one scale
per fused layer and per expert that it keeps. FP8 blocks are exported from models whose heads, q/k/v and gate/up
rows are whole 128-row blocks; for Llama and Mistral, whose SGLang loader drops block scales, they are refused."""

import json

import pytest
import torch
import transformers

from dist_quant.export import load_tensors
from dist_quant.parallel.spawn import run_ranks
from tests.conformance import engines, workers
from tests.e2e.jobs import TINY, tiny_checkpoint

pytestmark = pytest.mark.xdist_group("conformance")  # one worker computes the module's fixtures
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
# name -> (transformers config class, its keys)
ARCHITECTURES = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {}),
    "mistral": ("MistralConfig", {"sliding_window": 4096}),
    "qwen3-moe": ("Qwen3MoeConfig", {**MOE, "num_experts": 4}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "glm4-moe": ("Glm4MoeConfig", {**MOE, "n_routed_experts": 4, "n_group": 1, "topk_group": 1,
                                   "first_k_dense_replace": 1, "n_shared_experts": 1}),
    "deepseek-v3": ("DeepseekV3Config", {**MOE, "n_routed_experts": 4, "n_group": 1, "topk_group": 1,
                                         "first_k_dense_replace": 1, "n_shared_experts": 1, "num_key_value_heads": 4,
                                         "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
                                         "qk_rope_head_dim": 16, "v_head_dim": 16}),
    "llama-tied": ("LlamaConfig", {"tie_word_embeddings": True}),
    "qwen3-tied": ("Qwen3Config", {"tie_word_embeddings": True}),
    "qwen3-moe-tied": ("Qwen3MoeConfig", {**MOE, "num_experts": 4, "tie_word_embeddings": True}),
}
RECIPES = {
    "nvfp4": "nvfp4_default-fp8_kv", "fp8": "fp8_default-fp8_cast_kv", "mixed": workers.MIXED_RECIPE,
    "w4a16": "nvfp4_w4a16-fp8_cast_kv", "mixed-w4a16": workers.MIXED_W4A16_RECIPE, "mxfp8": "mxfp8_default-fp8_cast_kv",
    "fp8-blocks": "fp8_block_default-fp8_cast_kv", "mixed-block-experts": workers.MIXED_BLOCK_EXPERTS_RECIPE,
}
METHODS = {
    "nvfp4": ("modelopt_fp4", "modelopt_fp4"), "fp8": ("modelopt", "modelopt_fp8"), "mixed": ("modelopt_mixed", "modelopt_mixed"),
    "w4a16": ("modelopt_fp4", "modelopt_fp4"), "mixed-w4a16": ("modelopt_mixed", "modelopt_mixed"),
    "mxfp8": ("modelopt_mxfp8", "mxfp8"), "fp8-blocks": ("fp8", "fp8"), "mixed-block-experts": ("modelopt_mixed", "modelopt_mixed"),
}
BLOCK_FORMATS = ("fp8-blocks", "mixed-block-experts")
# FP8 blocks: heads of 128 channels, q/k/v and gate/up rows (experts' too) in whole 128-row blocks, every quantized
# weight in whole 128x128 blocks (attach_quantizers)
BLOCK_WIDTHS = dict(hidden_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=128, intermediate_size=256)
BLOCK_KEYS = {  # per architecture, beyond BLOCK_WIDTHS
    "deepseek-v3": dict(num_key_value_heads=2, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=128, qk_rope_head_dim=128, v_head_dim=128),
}
SGLANG_DROPS_SCALE_INV = {"llama", "mistral", "llama-tied"}  # LlamaForCausalLM's loader (engines.sglang_weight_name)
SCALE_INV_FORMATS = (*BLOCK_FORMATS, "mxfp8")  # whose scales SGLang loads as weight_scale_inv: refused there
MOE_ARCHS = {"qwen3-moe", "mixtral", "glm4-moe", "deepseek-v3", "qwen3-moe-tied"}
CASES = [
    (arch, fmt) for arch in ARCHITECTURES for fmt in RECIPES
    if not (fmt in SCALE_INV_FORMATS and arch in SGLANG_DROPS_SCALE_INV) and (fmt != "mixed-block-experts" or arch in MOE_ARCHS)
]
# multi-latent attention: only a cast FP8 cache is exported (export/problems.py LATENT_KV)
LATENT = {"deepseek-v3"}


def _recipe(arch: str, fmt: str):
    return workers.cast_kv(RECIPES[fmt]) if arch in LATENT else RECIPES[fmt]


def _block_keys(arch: str) -> dict:
    keys = ARCHITECTURES[arch][1]
    moe = {"moe_intermediate_size": 256} if "moe_intermediate_size" in keys else {}
    return {**keys, **BLOCK_WIDTHS, **moe, **BLOCK_KEYS.get(arch, {})}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("conformance")
    sources = {
        (arch, blocks): str(tiny_checkpoint(root / f"{arch}{'-blocks' * blocks}", cls, torch.float32,
                                            **({"tie_word_embeddings": False} | (_block_keys(arch) if blocks else keys))))
        for arch, (cls, keys) in ARCHITECTURES.items() for blocks in (False, True)
        if not blocks or arch not in SGLANG_DROPS_SCALE_INV
    }
    cases = {
        f"{arch}-{fmt}": (sources[arch, fmt in BLOCK_FORMATS], _recipe(arch, fmt), str(root / f"{arch}-{fmt}"))
        for arch, fmt in CASES
    }
    run_ranks(1, workers.export_cases, cases)
    out = {}
    for (arch, fmt), (_, _, directory) in zip(CASES, cases.values()):
        config = json.loads((root / f"{arch}-{fmt}" / "config.json").read_text())
        hf_quant_file = root / f"{arch}-{fmt}" / "hf_quant_config.json"  # none in the native fp8 form
        hf_quant = json.loads(hf_quant_file.read_text()) if hf_quant_file.exists() else None
        out[arch, fmt] = (config, hf_quant, load_tensors(directory))
    return out


def _quantized(tensors: dict, linears: set[str]) -> set[str]:
    """The linears stored quantized: with block or per-tensor weight scales."""
    return {m for m in linears if f"{m}.weight_scale" in tensors or f"{m}.weight_scale_inv" in tensors}


def _native(qc: dict) -> bool:
    return qc["quant_method"] == "fp8"


def _linears(config: dict) -> set[str]:
    """Every linear module of the model (2-D weights but the embedding), a tied head included."""
    from dist_quant.bridge import ModelBridge

    shapes = ModelBridge.from_hf({k: v for k, v in config.items() if k != "quantization_config"}, seq_len=1).hf_tensor_shapes()
    names = {n[: -len(".weight")] for n, s in shapes.items()
             if n.endswith(".weight") and len(s) == 2 and "embed_tokens" not in n}
    return names | ({"lm_head"} if config.get("tie_word_embeddings") else set())


def _engine_layer(module: str) -> str:
    """The layer an engine builds for a checkpoint module: fused q/k/v and gate/up, experts as one fused MoE."""
    parent, _, leaf = module.rpartition(".")
    if ".experts." in module:
        return module[: module.index(".experts.") + len(".experts")]
    if leaf in ("q_proj", "k_proj", "v_proj"):
        return f"{parent}.qkv_proj"
    if leaf in ("gate_proj", "up_proj"):
        return f"{parent}.gate_up_proj"
    if leaf in engines.PACKED["fused_qkv_a_proj"]:
        return f"{parent}.fused_qkv_a_proj"
    return module


@pytest.mark.parametrize("arch, fmt", CASES)
def test_both_engines_detect_the_method_and_its_group_size(exports, arch, fmt):
    config, hf_quant, _ = exports[arch, fmt]
    qc = config["quantization_config"]
    assert (engines.vllm_quant_method(qc), engines.sglang_quant_method(qc)) == METHODS[fmt]
    if fmt in ("nvfp4", "w4a16"):
        assert engines.vllm_nvfp4_required(hf_quant) == [] and engines.sglang_fp4_group_size(qc) == 16
    if fmt == "mixed-block-experts":  # the experts' Fp8MoEMethod runs 128x128 blocks
        assert engines.mixed_fp8_block_sizes(qc) == {128}
    if fmt == "fp8-blocks":
        assert engines.fp8_block_config_problem(qc) is None and qc["weight_block_size"] == [128, 128]


@pytest.mark.parametrize("arch, fmt", CASES)
def test_the_fp8_kv_cache_is_on_in_both_engines(exports, arch, fmt):
    """Under --kv-cache-dtype auto; vLLM reads the cache's dtype from ModelOpt configs only, so the native fp8 form
    needs --kv-cache-dtype fp8 there (its Fp8Config gives every attention Fp8KVCacheMethod, which loads k_scale and
    v_scale: docs/checkpoint.md)."""
    qc = exports[arch, fmt][0]["quantization_config"]
    assert engines.vllm_kv_cache_dtype(qc) == ("auto" if _native(qc) else "fp8_e4m3")
    assert engines.sglang_kv_cache_algo(qc) == "FP8"  # so RadixAttention has k_scale / v_scale to load into


@pytest.mark.parametrize("arch, fmt", CASES)
def test_the_engines_quantize_exactly_the_layers_stored_quantized(exports, arch, fmt):
    config, hf_quant, tensors = exports[arch, fmt]
    qc = config["quantization_config"]
    linears = _linears(config)
    quantized = _quantized(tensors, linears)
    assert quantized and quantized != linears  # some layers of each kind
    if fmt.startswith("mixed"):  # vLLM and SGLang take the layers from quantized_layers, by name
        layers = qc["quantized_layers"]
        assert set(layers) == quantized
        assert {m: e["quant_algo"] for m, e in layers.items()} == {m: _stored_algo(tensors, m) for m in quantized}
        return
    for layer in {_engine_layer(m) for m in linears}:
        members = {m for m in linears if _engine_layer(m) == layer}
        stored = {m in quantized for m in members}
        assert len(stored) == 1, f"{layer}: some members quantized, some not: an engine fuses them"
        expected_excluded = not stored.pop()
        if _native(qc):
            assert engines.vllm_fp8_skipped(layer, qc["modules_to_not_convert"]) == expected_excluded, layer
            if layer.rpartition(".")[2] != "fused_qkv_a_proj":  # SGLang's is one replicated linear of its own name
                assert engines.sglang_fp8_skipped(layer, qc["modules_to_not_convert"]) == expected_excluded, layer
            continue
        assert engines.vllm_excluded(layer, qc["ignore"]) == expected_excluded, layer
        if layer.rpartition(".")[2] not in engines.PACKED:  # SGLang matches fused layers by their own name
            assert engines.sglang_excluded(layer, qc["ignore"]) == expected_excluded, layer


def _stored_algo(tensors: dict, module: str) -> str:
    """The algo a quantized module was calibrated in, from its tensors alone: packed NVFP4 or FP8 weights, and
    whether its input was quantized (an input_scale); FP8 weights with E8M0 (uint8) block scales are MXFP8, with
    float32 128x128 block scales (weight_scale_inv) FP8 blocks."""
    if tensors[f"{module}.weight"].dtype == torch.uint8:
        return "NVFP4" if f"{module}.input_scale" in tensors else "W4A16_NVFP4"
    if f"{module}.weight_scale_inv" in tensors:
        return "FP8_PB_WO"
    return "MXFP8" if tensors[f"{module}.weight_scale"].dtype == torch.uint8 else "FP8"


PARAMETERS = ("weight", "weight_scale", "weight_scale_inv", "weight_scale_2", "input_scale")


@pytest.mark.parametrize("arch, fmt", CASES)
def test_each_engine_runs_every_layer_in_its_algo_with_every_parameter_loaded(exports, arch, fmt):
    """Weight-only layers must run weight-only (vLLM's W4A4 path would fold an input scale never loaded; SGLang's
    would start it at 1.0), and every parameter an engine registers for a quantized layer must come from the
    checkpoint: one left at its initial value is silently wrong at serve time."""
    config, _, tensors = exports[arch, fmt]
    qc = config["quantization_config"]
    architecture = config["architectures"][0]
    for module in _quantized(tensors, _linears(config)):
        algo = _stored_algo(tensors, module)
        stored = {p for p in PARAMETERS if f"{module}.{p}" in tensors}
        assert engines.vllm_layer_algo(qc, module) == algo == engines.sglang_layer_algo(qc, module), module
        assert stored == engines.VLLM_LAYER_PARAMS[algo], module
        loaded = {engines.sglang_weight_name(architecture, f"{module}.{p}", engines.sglang_quant_method(qc)) for p in stored}
        assert loaded == {f"{module}.{p}" for p in engines.SGLANG_LAYER_PARAMS[algo]}, module


@pytest.mark.parametrize("arch, fmt", CASES)
def test_every_kv_scale_lands_in_both_engines(exports, arch, fmt):
    config, _, tensors = exports[arch, fmt]
    scales = [n for n in tensors if n.endswith(("k_scale", "v_scale"))]
    assert len(scales) == 2 * config["num_hidden_layers"]
    architecture = config["architectures"][0]
    latent = arch in LATENT
    attention = "mla_attn.mla_attn" if latent else "attn"
    for name in scales:
        layer = name[: name.index(".self_attn.")]
        assert engines.vllm_kv_scale_target(name, latent) == f"{layer}.self_attn.{attention}.{name[-7]}_scale", name
        assert engines.sglang_kv_scale_loaded(architecture, name), name
        if latent:  # one row [latent | rope key] under one scale, 1.0: what both engines' MLA caches serve
            assert tensors[name].item() == 1.0, name


@pytest.mark.parametrize("arch, fmt", CASES)
def test_fused_layers_and_experts_hold_the_scales_the_engines_keep(exports, arch, fmt):
    """vLLM keeps one weight_scale_2 / input_scale per fused layer (the max, or the gate's for MoE) without
    rescaling block scales: they must agree. Every expert needs every scale, dead experts too."""
    config, _, tensors = exports[arch, fmt]
    quantized = _quantized(tensors, _linears(config))
    for layer in {_engine_layer(m) for m in quantized}:
        members = sorted(m for m in quantized if _engine_layer(m) == layer)
        if ".experts" in layer:
            for member in members:
                needed = engines.VLLM_LAYER_PARAMS[_stored_algo(tensors, member)]
                assert all(f"{member}.{s}" in tensors for s in needed), member
            members = [m for m in members if m.endswith(("gate_proj", "up_proj", ".w1", ".w3"))]
            groups = {}
            for m in members:  # each expert's gate and up are one fused weight
                groups.setdefault(m.rpartition(".")[0], []).append(m)
        else:
            groups = {layer: members}
        for fused in groups.values():
            for scale in ("weight_scale_2", "input_scale"):
                values = [tensors[f"{m}.{scale}"] for m in fused if f"{m}.{scale}" in tensors]
                assert all(torch.equal(values[0], v) for v in values), (fused, scale)


@pytest.mark.parametrize("arch, fmt", [(a, f) for a, f in CASES if a.endswith("-tied")])
def test_a_tied_head_is_excluded_in_both_engines(exports, arch, fmt):
    config, hf_quant, tensors = exports[arch, fmt]
    qc = config["quantization_config"]
    assert "lm_head.weight" not in tensors
    if fmt.startswith("mixed"):
        assert "lm_head" not in qc["quantized_layers"]
        return
    if _native(qc):  # vLLM's head is no LinearBase its Fp8Config quantizes; listed all the same, as ModelOpt does
        assert "lm_head" in qc["modules_to_not_convert"] and engines.sglang_fp8_skipped("lm_head", qc["modules_to_not_convert"])
        return
    assert "lm_head" in hf_quant["quantization"]["exclude_modules"]
    ignore = config["quantization_config"]["ignore"]
    assert engines.vllm_excluded("lm_head", ignore) and engines.sglang_excluded("lm_head", ignore)


@pytest.mark.parametrize("fmt, algo", [("fp8-blocks", "FP8_PB_WO"), ("mxfp8", "MXFP8")])
@pytest.mark.parametrize("arch, architecture", [("llama", "LlamaForCausalLM"), ("mistral", "MistralForCausalLM")])
def test_scale_inv_formats_are_refused_where_sglang_drops_their_scales(arch, architecture, fmt, algo):
    """SGLang 0.5.23's Llama loader looks every weight_scale_inv up as weight_scale, which its block-FP8 and MXFP8
    layers do not have (MXFP8's weight_scale is renamed weight_scale_inv first): the export is refused at
    startup, in one line."""
    from dist_quant.bridge import ModelBridge
    from dist_quant.export import ExportError, check_exportable
    from dist_quant.recipe import load_recipe

    method = "mxfp8" if fmt == "mxfp8" else "fp8"
    name = "m.weight_scale" if fmt == "mxfp8" else "m.weight_scale_inv"
    assert engines.sglang_weight_name(architecture, name, method) == "m.weight_scale"
    assert engines.sglang_weight_name("Qwen3ForCausalLM", name, method) == "m.weight_scale_inv"
    cls, keys = ARCHITECTURES[arch]
    config = {**getattr(transformers, cls)(**{**TINY, **keys, **BLOCK_WIDTHS}).to_dict(), "architectures": [architecture]}
    with pytest.raises(ExportError, match=f"is {algo}: SGLang 0.5.23's {architecture} loader renames weight_scale_inv"):
        check_exportable(load_recipe(RECIPES[fmt]), ModelBridge.from_hf(config, seq_len=16))
