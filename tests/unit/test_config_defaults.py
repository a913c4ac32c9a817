"""A config.json that leaves keys out is read as transformers reads it: the key takes the value transformers'
config class of that model type gives it (the outside oracle for what transformers and the engines build), not a
default of ours."""

import pytest
import transformers

from dist_quant.bridge import BridgeError, ModelBridge

SMALL = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 8}
MOE = {"num_experts_per_tok": 2}


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "num_key_value_heads": 4}, "head_dim"),
        ({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": 4, **MOE}, "num_key_value_heads"),
        ({"architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "moe_intermediate_size": 16,
          "n_routed_experts": 4, "n_group": 1, "topk_group": 1, **MOE}, "n_shared_experts"),
        ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "sliding_window"),
    ],
    ids=["qwen3", "mixtral", "glm4_moe", "mistral"],
)
def test_left_out_keys_take_transformers_values(raw, key):
    raw = {**SMALL, **raw}
    bridge = ModelBridge.from_hf(raw, seq_len=64)
    expected = transformers.AutoConfig.for_model(**raw)
    assert key not in raw and bridge.hf_config[key] == getattr(expected, key)
    head_dim = getattr(expected, "head_dim", None) or SMALL["hidden_size"] // SMALL["num_attention_heads"]
    assert bridge.head_dim == head_dim
    assert bridge.config.rope.theta == expected.rope_parameters["rope_theta"]
    assert bridge.config.rope.partial_rotary_factor == expected.rope_parameters.get("partial_rotary_factor", 1.0)


def test_rope_values_transformers_keeps_in_rope_parameters():
    mixtral = ModelBridge.from_hf({**SMALL, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                                   "num_local_experts": 4, "num_key_value_heads": 8, **MOE})
    assert mixtral.config.rope.theta == 1e6  # Mixtral's base, not the usual 10,000
    glm = ModelBridge.from_hf({**SMALL, "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe",
                               "moe_intermediate_size": 16, "n_routed_experts": 4, "n_group": 1, "topk_group": 1, **MOE})
    assert glm.config.rope.partial_rotary_factor == 0.5  # GLM rotates half of each head


def test_a_left_out_value_that_cannot_be_honoured_says_it_is_transformers():
    mistral = {**SMALL, "architectures": ["MistralForCausalLM"], "model_type": "mistral"}
    with pytest.raises(BridgeError, match=r"sliding_window = 4096: .* \(config.json leaves out sliding_window: this is transformers' value for it\)$"):
        ModelBridge.from_hf(mistral, seq_len=8192)
