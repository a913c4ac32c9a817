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


@pytest.mark.parametrize("config", [LLAMA_3_2_1B, QWEN3_0_6B, QWEN3_30B_A3B], ids=["llama-3.2-1b", "qwen3-0.6b", "qwen3-30b-a3b"])
def test_published_configs_are_read_whole(config):
    bridge = ModelBridge.from_hf(config, seq_len=4096)
    assert bridge.dtype == torch.bfloat16
    assert bridge.config.rope.rope_type == ("llama3" if "llama" in config["model_type"] else "default")



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
