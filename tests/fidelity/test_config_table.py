"""The bridge reads config.json through one table of keys: real checkpoints' configs pass; every key that would
change the forward in a way dist_quant does not compute fails with one line naming the key and its value; rope
frequencies equal transformers' own for every implemented rope type."""


import pytest
import torch

from dist_quant.bridge import BridgeError, ModelBridge
from dist_quant.bridge.rope import RopeSpec
from tests.reference.configs import DROP, changed

# The config.json files of the Hub checkpoints, as published (transformers 4 key names).
LLAMA_3_2_1B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192, "rope_type": "llama3"}, "rope_theta": 500000.0,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.45.0.dev0", "use_cache": True,
    "vocab_size": 128256,
}
QWEN3_0_6B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024, "initializer_range": 0.02,
    "intermediate_size": 3072, "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936,
}
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 40960,
    "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768,
    "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}


DEEPSEEK_V3 = {  # DeepSeek-V3 / R1, block-FP8 as released
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config", "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
    "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"}, "rope_theta": 10000,
    "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True, "tie_word_embeddings": False,
    "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "transformers_version": "4.46.3",
    "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}
KIMI_K2 = {  # Kimi-K2-Instruct: DeepSeek-V3's architecture, 384 experts in one group, 64 heads, no MTP
    **DEEPSEEK_V3, "model_type": "kimi_k2", "bos_token_id": 163584, "eos_token_id": 163585, "first_k_dense_replace": 1,
    "max_position_embeddings": 131072, "n_group": 1, "n_routed_experts": 384, "num_attention_heads": 64,
    "num_key_value_heads": 64, "num_nextn_predict_layers": 0, "rope_theta": 50000.0, "routed_scaling_factor": 2.827,
    "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "topk_group": 1, "transformers_version": "4.48.3", "vocab_size": 163840,
}


@pytest.mark.parametrize(
    "config", [LLAMA_3_2_1B, QWEN3_0_6B, QWEN3_30B_A3B, DEEPSEEK_V3, KIMI_K2],
    ids=["llama-3.2-1b", "qwen3-0.6b", "qwen3-30b-a3b", "deepseek-v3", "kimi-k2"],
)
def test_published_configs_are_read_whole(config):
    bridge = ModelBridge.from_hf(config, seq_len=4096)
    assert bridge.dtype == torch.bfloat16
    expected = {"llama": "llama3", "deepseek_v3": "yarn", "kimi_k2": "yarn"}.get(config["model_type"], "default")
    assert bridge.config.rope.rope_type == expected


def test_deepseek_v3_is_what_transformers_and_vllm_compute():
    """MLA's widths, the routing (58 MoE layers after 3 dense, groups of 32 experts, 4 of 8 chosen) and the softmax
    scale 192^-1/2 x (0.1 ln 40 + 1)^2 that transformers and vLLM give DeepSeek-V3."""
    bridge = ModelBridge.from_hf(DEEPSEEK_V3, seq_len=4096)
    forward = bridge.forward
    assert (forward.latent.q_lora_rank, forward.latent.kv_lora_rank, forward.latent.qk_head_dim) == (1536, 512, 192)
    assert forward.moe_layers == tuple(range(3, 61)) and forward.num_experts == 256 and forward.shared_expert_width == 2048
    assert forward.router["moe_router_num_groups"] == 8 and forward.router["moe_router_group_topk"] == 4
    assert bridge.config.rope.latent_softmax_scale(192) == pytest.approx(0.1352337788608801, rel=1e-15)
    assert bridge.config.rope.attention_factor() == 1.0
    bridge.check_layout(tp=8, ep=8)  # 1536 and 576 latent rows over 8 ranks



REFUSED = {
    "dynamic-rope": (changed(LLAMA_3_2_1B, rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_scaling = ", "'dynamic' is refused"),
    "longrope": (changed(LLAMA_3_2_1B, rope_scaling={"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}), "rope_scaling = ", "'longrope' is refused"),
    "unknown-rope-type": (changed(QWEN3_0_6B, rope_scaling={"type": "su", "factor": 2.0}), "rope_scaling = ", "rope_type 'su' is not implemented"),
    "unknown-rope-key": (changed(LLAMA_3_2_1B, rope_scaling={**LLAMA_3_2_1B["rope_scaling"], "beta": 2}), "rope_scaling = ", "beta = 2 is not understood"),
    "partial-rotary": (changed(QWEN3_0_6B, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5}, rope_scaling=DROP), "rope_parameters = ", "partial rotary"),
    "explicit-attention-factor": (changed(QWEN3_0_6B, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "attention_factor": 1.5}), "rope_scaling = ", "explicit attention factor"),
    "sliding-window": (changed(QWEN3_0_6B, use_sliding_window=True, sliding_window=1024, max_window_layers=20), "use_sliding_window = True", "acts in layers 20-27 on sequences of 4096 tokens"),
    "moe-sliding-window": (changed(QWEN3_30B_A3B, use_sliding_window=True, sliding_window=1024), "use_sliding_window = True", "acts in layers 0-47 on sequences of 4096 tokens"),
    "mlp-bias": (changed(LLAMA_3_2_1B, mlp_bias=True), "mlp_bias = True", "biases in the MLP"),
    "gelu": (changed(QWEN3_0_6B, hidden_act="gelu"), "hidden_act = 'gelu'", "SiLU"),
    "dense-layer-out-of-range": (changed(QWEN3_30B_A3B, mlp_only_layers=[0, 48]), "mlp_only_layers = [0, 48]", "below num_hidden_layers (48)"),
    "sparse-step": (changed(QWEN3_30B_A3B, decoder_sparse_step=0), "decoder_sparse_step = 0", "above 0"),
    "unknown-key": (changed(LLAMA_3_2_1B, logit_softcapping=30.0), "logit_softcapping = 30.0", "not a key the LlamaForCausalLM bridge knows"),
    "already-quantized": (changed(QWEN3_0_6B, quantization_config={"quant_method": "fp8"}), "quantization_config = ", "already quantized"),
    "remote-code": (changed(QWEN3_0_6B, auto_map={"AutoModel": "x.Y"}), "auto_map = ", "its own modeling code"),
    "bad-dtype": (changed(QWEN3_0_6B, torch_dtype="float8"), "torch_dtype = 'float8'", "expected one of"),
    "bad-type": (changed(LLAMA_3_2_1B, hidden_size="2048"), "hidden_size = '2048'", "expected an integer"),
    "not-positive": (changed(LLAMA_3_2_1B, num_hidden_layers=0), "num_hidden_layers = 0", "above 0"),
    "mla-rope-halves": (changed(DEEPSEEK_V3, rope_interleave=False), "rope_interleave = False", "interleaved pairs"),
    "mla-greedy-routing": (changed(DEEPSEEK_V3, topk_method="greedy"), "topk_method = 'greedy'", "noaux_tc"),
    "mla-softmax-scores": (changed(DEEPSEEK_V3, scoring_func="softmax"), "scoring_func = 'softmax'", "sigmoid"),
    "mla-kv-heads": (changed(DEEPSEEK_V3, num_key_value_heads=16), "num_key_value_heads = 16", "expected 128"),
    "mla-norm-eps": (changed(DEEPSEEK_V3, rms_norm_eps=1e-5), "rms_norm_eps = 1e-05", "eps 1e-6"),
    "mla-bias": (changed(DEEPSEEK_V3, attention_bias=True), "attention_bias = True", "megatron-core's MLA has none"),
    "mla-rope-head-dim": (changed(DEEPSEEK_V3, head_dim=128), "head_dim = 128", "expected 64"),
    "mla-odd-rope": (changed(DEEPSEEK_V3, qk_rope_head_dim=63), "qk_rope_head_dim = 63", "even"),
    "mla-yarn-attention-factor": (
        changed(DEEPSEEK_V3, rope_scaling={**DEEPSEEK_V3["rope_scaling"], "mscale": 0.707}), "rope_scaling = ",
        "multiplies cos and sin by",
    ),
    "mla-group-scoring": (changed(DEEPSEEK_V3, topk_group=2), "n_group = 8", "top-2 experts"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_forward_changing_keys_fail_with_one_line_naming_them(case):
    config, key, reason = REFUSED[case]
    with pytest.raises(BridgeError) as error:
        ModelBridge.from_hf(config, seq_len=4096)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"config.json: {key}") and reason in message, message


def test_a_sliding_window_that_never_acts_passes_and_one_that_might_needs_the_length():
    config = changed(QWEN3_0_6B, use_sliding_window=True, sliding_window=4096, max_window_layers=20)
    ModelBridge.from_hf(config, seq_len=4096)
    with pytest.raises(BridgeError, match="acts in layers 20-27 on sequences of 4097 tokens"):
        ModelBridge.from_hf(config, seq_len=4097)
    with pytest.raises(BridgeError, match="give the calibration length"):
        ModelBridge.from_hf(config)
    explicit = changed(config, layer_types=["full_attention"] * 27 + ["sliding_attention"])
    with pytest.raises(BridgeError, match="acts in layer 27 "):
        ModelBridge.from_hf(explicit, seq_len=8192)


ROPES = {
    "default": {"rope_type": "default", "rope_theta": 1e6},
    "linear": {"rope_type": "linear", "rope_theta": 1e4, "factor": 8.0},
    "llama3-3.2": LLAMA_3_2_1B["rope_scaling"] | {"rope_theta": 500000.0},
    "llama3-other": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0, "original_max_position_embeddings": 512},
    "yarn-qwen": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32768},
    "yarn-mscale": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 16, "beta_slow": 2},
    "yarn-mscale-untruncated": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 16.0, "original_max_position_embeddings": 4096, "mscale": 1.0, "mscale_all_dim": 0.0, "truncate": False},
}


@pytest.mark.parametrize("rope", ROPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rope_frequencies_and_attention_factor_are_transformers_own(rope, head_dim):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    keys = dict(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=131072)
    config = transformers.LlamaConfig(**keys, rope_parameters=dict(ROPES[rope]))
    rope_type = config.rope_parameters["rope_type"]
    expected_inv_freq, expected_factor = (
        ROPE_INIT_FUNCTIONS[rope_type](config, "cpu") if rope_type != "default" else (None, 1.0)
    )
    spec = RopeSpec.from_config({**keys, "rope_parameters": dict(ROPES[rope])})
    assert spec.problem() is None
    if expected_inv_freq is None:  # transformers' default: the plain formula
        expected_inv_freq = 1.0 / (spec.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    assert torch.equal(spec.inv_freq(head_dim), expected_inv_freq)
    assert spec.attention_factor() == expected_factor
