"""check_exportable: a recipe the checkpoint cannot hold is refused from the recipe and config.json alone, with
one line naming the recipe and the quantizer; every built-in recipe passes for every built-in model."""

import pytest

from dist_quant.bridge import ModelBridge
from dist_quant.export import ExportError, check_exportable
from dist_quant.job import CONFIGS, builtin_models
from dist_quant.recipe import builtin_recipe_names, load_recipe
from tests.reference.configs import DROP, changed

OFF = {"quantizer_name": "*", "enable": False}
NVFP4 = {"num_bits": "e2m1", "block_sizes": {-1: 16}}
FP8 = {"num_bits": "e4m3"}
EXPERT = "decoder.layers.0.mlp.experts.local_experts"


def recipe(*entries) -> dict:
    return {"quantize": {"algorithm": "max", "quant_cfg": [OFF, *entries]}}


def on(pattern: str, cfg: dict | None = None) -> dict:
    return {"quantizer_name": pattern, "cfg": cfg} if cfg else {"quantizer_name": pattern, "enable": True}


def off(pattern: str) -> dict:
    return {"quantizer_name": pattern, "enable": False}


W4A4 = (on("*weight_quantizer", NVFP4), on("*input_quantizer", NVFP4))


@pytest.fixture(scope="module")
def moe():
    return ModelBridge.from_hf(CONFIGS / "tiny-qwen3-moe.json")


def refusal(bridge, raw: dict) -> str:
    with pytest.raises(ExportError) as caught:
        check_exportable(load_recipe(raw), bridge)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("recipe <dict>: ")
    return message.removeprefix("recipe <dict>: ")


@pytest.mark.parametrize("model", builtin_models())
def test_every_builtin_recipe_is_exportable_for_every_builtin_model_with_experts(model):
    """...but a recipe for experts alone quantizes no weight of a dense model, whose export would fail, and
    multi-latent attention's KV cache serves only as a cast FP8 one."""
    bridge = ModelBridge.from_hf(CONFIGS / f"{model}.json")
    for name in builtin_recipe_names():
        if name.startswith("fp8_block") and bridge.forward.latent is None and bridge.head_dim % 128:  # fused q/k/v rows
            with pytest.raises(ExportError, match=f"recipe {name} .built-in.: .*(heads of {bridge.head_dim} channels|no whole number of 128-row FP8 blocks)"):
                check_exportable(load_recipe(name), bridge)
        elif "experts_only" in name and not bridge.moe:
            with pytest.raises(ExportError, match=f"recipe {name} .built-in.: the recipe quantizes no linear weight"):
                check_exportable(load_recipe(name), bridge)
        elif bridge.forward.latent is not None and not name.endswith("-fp8_cast_kv"):
            with pytest.raises(ExportError, match=f"recipe {name} .built-in.: .*multi-latent attention caches one row"):
                check_exportable(load_recipe(name), bridge)
        else:
            check_exportable(load_recipe(name), bridge)


REFUSED = {
    "fp8-weight-only": (
        recipe(on("*weight_quantizer", FP8)),
        "decoder.layers.0.self_attention.linear_qkv.weight_quantizer / input_quantizer: FP8 weights with unquantized "
        "inputs (weight-only FP8) have no checkpoint form vLLM or SGLang load",
    ),
    "nvfp4-weights-fp8-inputs": (
        recipe(on("*weight_quantizer", NVFP4), on("*input_quantizer", FP8)),
        "decoder.layers.0.self_attention.linear_qkv.weight_quantizer / input_quantizer: NVFP4 weights with FP8 "
        "inputs (ModelOpt's W4A8_NVFP4_FP8) are not a format vLLM loads",
    ),
    "fp8-weights-nvfp4-inputs": (
        recipe(on("*weight_quantizer", FP8), on("*input_quantizer", NVFP4)),
        "decoder.layers.0.self_attention.linear_qkv.weight_quantizer / input_quantizer: FP8 weights with NVFP4 inputs",
    ),
    "per-channel-fp8": (
        recipe(on("*weight_quantizer", {"num_bits": "e4m3", "axis": 0}), on("*input_quantizer", FP8)),
        "decoder.layers.0.self_attention.linear_qkv.weight_quantizer: per-channel FP8 weight scales (axis: 0) are not "
        "part of the checkpoint format",
    ),
    "output-quantizer": (
        recipe(*W4A4, on("*linear_proj.output_quantizer", FP8)),
        "decoder.layers.0.self_attention.linear_proj.output_quantizer: the checkpoint format has no output scales",
    ),
    "input-of-an-unquantized-weight": (
        recipe(*W4A4, off("*linear_fc2.weight_quantizer")),
        "decoder.layers.0.mlp.experts.local_experts.0.linear_fc2.input_quantizer: the input of a layer whose weight "
        "stays unquantized has no scale in the checkpoint",
    ),
    "kv-only": (
        recipe(on("*[kv]_bmm_quantizer", FP8)),
        "the recipe quantizes no linear weight: the checkpoint format describes quantized weights",
    ),
    "nothing": (recipe(), "the recipe quantizes no linear weight"),
    "k-without-v": (
        recipe(*W4A4, on("*k_bmm_quantizer", FP8)),
        "decoder.layers.0.self_attention.core_attention: K fp8, V unquantized: the checkpoint has one KV cache format",
    ),
    "kv-in-one-layer": (
        recipe(*W4A4, on("decoder.layers.1.*[kv]_bmm_quantizer", FP8)),
        "decoder.layers.1.self_attention.core_attention: K fp8, V fp8, but decoder.layers.0.self_attention."
        "core_attention: K unquantized, V unquantized: the engines give every layer's KV cache one format",
    ),
    "experts-fc1-w4a4-fc2-w4a16": (
        recipe(*W4A4, off("*linear_fc2.input_quantizer")),
        f"{EXPERT}.0.linear_fc2 is W4A16_NVFP4, {EXPERT}.0.linear_fc1 NVFP4: vLLM and SGLang run an MoE layer's experts "
        "as one fused layer of one format",
    ),
    "one-expert-unquantized": (
        recipe(*W4A4, off(f"{EXPERT}.3.*")),
        f"{EXPERT}.3.linear_fc1 is unquantized, {EXPERT}.0.linear_fc1 NVFP4: vLLM and SGLang run",
    ),
}


@pytest.mark.parametrize("raw, expected", REFUSED.values(), ids=REFUSED.keys())
def test_a_recipe_the_checkpoint_cannot_hold_is_refused_naming_the_quantizer(moe, raw, expected):
    assert refusal(moe, raw).startswith(expected)


ACCEPTED = {
    "w4a16": recipe(on("*weight_quantizer", NVFP4)),
    "fp8-attention-w4a16-mlp": recipe(
        on("*self_attention.linear_*.weight_quantizer", FP8), on("*self_attention.linear_*.input_quantizer", FP8),
        on("*mlp*weight_quantizer", NVFP4),
    ),
    "w4a4-attention-w4a16-experts": recipe(*W4A4, off("*experts*input_quantizer")),
    "experts-only": recipe(on("*experts*weight_quantizer", NVFP4), on("*experts*input_quantizer", NVFP4)),
    "kv-in-every-layer-and-head": recipe(*W4A4, on("*[kv]_bmm_quantizer", NVFP4)),
}


@pytest.mark.parametrize("raw", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_the_forms_the_engines_load_pass(moe, raw):
    check_exportable(load_recipe(raw), moe)


def test_a_dense_model_has_no_expert_rule_and_names_its_own_modules():
    dense = ModelBridge.from_hf(CONFIGS / "tiny-qwen3.json")
    check_exportable(load_recipe(recipe(*W4A4, off("*linear_fc2.input_quantizer"))), dense)  # mixed W4A4 / W4A16
    assert refusal(dense, recipe(on("*linear_fc2.weight_quantizer", FP8))).startswith(
        "decoder.layers.0.mlp.linear_fc2.weight_quantizer / input_quantizer: FP8 weights with unquantized inputs"
    )


TINY_MLA = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 256, "hidden_size": 64,
    "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 4, "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16,
    "v_head_dim": 16, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
    "first_k_dense_replace": 1, "n_shared_experts": 1, "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
}
CAST = {"num_bits": "e4m3", "use_constant_amax": True}


@pytest.mark.parametrize("kv, expected", {
    "calibrated-fp8": (FP8, "multi-latent attention caches one row per token"),
    "nvfp4": (NVFP4, "multi-latent attention caches one row per token"),
}.values(), ids=["calibrated-fp8", "nvfp4"])
def test_multi_latent_attention_exports_only_a_cast_fp8_cache(kv, expected):
    """vLLM quantizes MLA's cached row with one scale it loads; SGLang's default MLA backends write it unscaled and
    read it scaled: only 1.0 serves in both (docs/checkpoint.md)."""
    mla = ModelBridge.from_hf(TINY_MLA)
    message = refusal(mla, recipe(*W4A4, on("*[kv]_bmm_quantizer", kv)))
    assert message.startswith("decoder.layers.0.self_attention.core_attention: ") and expected in message
    check_exportable(load_recipe(recipe(*W4A4, on("*[kv]_bmm_quantizer", CAST))), mla)
    check_exportable(load_recipe(recipe(*W4A4)), mla)  # no KV cache quantization at all


def test_the_linears_vllm_fuses_share_one_algo():
    """DeepSeek's q and kv down-projections are two Megatron linears and one vLLM layer (fused_qkv_a_proj)."""
    mla = ModelBridge.from_hf(TINY_MLA)
    assert refusal(mla, recipe(*W4A4, off("*linear_kv_down_proj.input_quantizer"))).startswith(
        "decoder.layers.0.self_attention.linear_q_down_proj NVFP4, decoder.layers.0.self_attention.linear_kv_down_proj "
        "W4A16_NVFP4: vLLM 0.33 runs them as one fused layer of one format"
    )


MXFP4 = {"num_bits": "e2m1", "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": "e8m0"}}
FP8_BLOCKS, FP8_GROUPS = {"num_bits": "e4m3", "block_sizes": {-1: 128, -2: 128}}, {"num_bits": "e4m3", "block_sizes": {-1: 128, "type": "dynamic"}}
MXFP8 = {"num_bits": "e4m3", "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": "e8m0"}}


@pytest.mark.parametrize("entries, expected", [
    ((on("*weight_quantizer", MXFP4), on("*input_quantizer", MXFP4)), "MXFP4 has no checkpoint form vLLM 0.33 and SGLang 0.5.23 both load"),
    ((on("*weight_quantizer", MXFP8),), "MXFP8 weights with unquantized inputs have no ModelOpt form"),
], ids=["mxfp4", "mxfp8-weight-only"])
def test_formats_without_a_form_both_engines_load_are_refused_at_startup(moe, entries, expected):
    assert expected in refusal(moe, recipe(*entries))
    check_exportable(load_recipe(recipe(on("*weight_quantizer", MXFP8), on("*input_quantizer", MXFP8))), moe)


def test_mxfp8_layers_are_refused_in_a_checkpoint_of_several_formats(moe):
    """vLLM and SGLang name MXFP8 scales differently in MIXED_PRECISION checkpoints: no one checkpoint serves both."""
    mixed = recipe(*W4A4, on("*self_attention*weight_quantizer", MXFP8), on("*self_attention*input_quantizer", MXFP8))
    message = refusal(moe, mixed)
    assert message.startswith("decoder.layers.0.") and "is MXFP8 in a checkpoint of several formats" in message
    assert "SGLang 0.5.23 with weight_scale_inv" in message


# FP8 128x128 blocks need rows in whole blocks where the engines fuse modules, and heads of a multiple of 128
# channels (Megatron interleaves q, k and v rows per query group): a Qwen3-MoE with both
BLOCKS_MOE = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 256, "hidden_size": 128,
    "intermediate_size": 256, "moe_intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 1, "head_dim": 128, "num_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 64,
}
FP8_BLOCK_RECIPE = recipe(on("*weight_quantizer", FP8_BLOCKS), on("*input_quantizer", FP8_GROUPS), on("*[kv]_bmm_quantizer", FP8), off("*output_layer*"))


def blocks_model(**changes):
    return ModelBridge.from_hf(changed(BLOCKS_MOE, **changes))


@pytest.mark.parametrize("raw", [
    FP8_BLOCK_RECIPE,
    recipe(on("*weight_quantizer", FP8_BLOCKS), off("*output_layer*")),  # weight-only: the engines quantize the inputs
    recipe(on("*experts*weight_quantizer", FP8_BLOCKS), on("*experts*input_quantizer", FP8_GROUPS)),  # experts alone
    # FP8-block experts beside NVFP4 attention: a MIXED_PRECISION checkpoint both engines load
    recipe(on("*experts*weight_quantizer", FP8_BLOCKS), on("*self_attention*weight_quantizer", NVFP4), on("*self_attention*input_quantizer", NVFP4)),
    recipe(*W4A4, on("*experts*weight_quantizer", FP8_BLOCKS), off("*experts*input_quantizer")),
], ids=["w8a8-blocks", "weight-only-blocks", "experts-only", "block-experts-nvfp4-attention", "block-experts-nvfp4-rest"])
def test_fp8_blocks_export_alone_or_as_the_experts_of_a_mixed_checkpoint(raw):
    check_exportable(load_recipe(raw), blocks_model())


BLOCK_REFUSED = {
    "block-linear-in-mixed": (
        {}, recipe(*W4A4, on("*self_attention*weight_quantizer", FP8_BLOCKS), off("*self_attention*input_quantizer")),
        "decoder.layers.0.self_attention.linear_qkv is FP8_PB_WO: FP8 128x128 blocks beside other formats (a "
        "MIXED_PRECISION checkpoint) are for routed experts only: vLLM 0.33 loads FP8_PB_WO linear layers there with a "
        "4-D weight_scale",
    ),
    "block-experts-without-nvfp4": (
        {}, recipe(on("*experts*weight_quantizer", FP8_BLOCKS), on("*self_attention*weight_quantizer", FP8),
                   on("*self_attention*input_quantizer", FP8)),
        f"{EXPERT}.0.linear_fc1 is FP8_PB_WO in a checkpoint of several formats: SGLang 0.5.23 reads a "
        "MIXED_PRECISION checkpoint without an NVFP4 or W4A16_NVFP4 layer as its w4afp8 method",
    ),
    "nvfp4-kv": (
        {}, recipe(on("*weight_quantizer", FP8_BLOCKS), on("*[kv]_bmm_quantizer", NVFP4), off("*output_layer*")),
        "decoder.layers.0.self_attention.core_attention: K nvfp4, V nvfp4: the native fp8 form of FP8 128x128 blocks "
        "holds an FP8 KV cache or none",
    ),
    "heads-of-64": (
        {"head_dim": 64, "num_attention_heads": 4, "num_key_value_heads": 2}, FP8_BLOCK_RECIPE,
        "decoder.layers.0.self_attention.linear_qkv: heads of 64 channels: Megatron's fused q/k/v weight holds each "
        "query group's q, k and v rows in turn",
    ),
    "gate-rows": (
        {"intermediate_size": 320, "mlp_only_layers": [0]}, recipe(on("*mlp.linear_fc*weight_quantizer", FP8_BLOCKS)),
        "decoder.layers.0.mlp.linear_fc1: model.layers.0.mlp.gate_proj has 320 rows, no whole number of 128-row FP8 "
        "blocks, which vLLM 0.33 and SGLang 0.5.23 need where they fuse it with its siblings",
    ),
    "expert-rows": (
        {"moe_intermediate_size": 64}, FP8_BLOCK_RECIPE,
        f"{EXPERT}.0.linear_fc1: model.layers.0.mlp.experts.0.gate_proj has 64 rows, no whole number of 128-row FP8 blocks",
    ),
    "head": (
        {}, recipe(on("*weight_quantizer", FP8_BLOCKS)),
        "output_layer is FP8_PB_WO: the engines' fp8 method quantizes no output head",
    ),
    "llama": (
        {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **dict.fromkeys(("moe_intermediate_size", "num_experts", "num_experts_per_tok"), DROP)},
        FP8_BLOCK_RECIPE,
        "decoder.layers.0.mlp.linear_fc1 is FP8_PB_WO: SGLang 0.5.23's LlamaForCausalLM loader renames "
        "weight_scale_inv, the name its FP8_PB_WO layers load their scales by, to weight_scale and drops them",
    ),
}


@pytest.mark.parametrize("changes, raw, expected", BLOCK_REFUSED.values(), ids=BLOCK_REFUSED.keys())
def test_fp8_blocks_the_engines_cannot_load_are_refused_in_one_line(changes, raw, expected):
    assert refusal(blocks_model(**changes), raw).startswith(expected)

