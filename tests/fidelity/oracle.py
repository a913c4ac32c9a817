"""The outside oracle: checkpoints made by transformers (random weights, float32, scaled so that activations vary)
with the config features dist_quant claims, and the max |activation| that transformers' own forward feeds each
quantizer, under the Hugging Face quantizer names the bridge exports amax as."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tests.reference.tolerance import assert_equal_up_to_rounding

VOCAB, SEQ, BATCH, BATCHES = 128, 64, 2, 2
_COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, rms_norm_eps=1e-6,
)
_MOE = dict(moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2)
LLAMA3_ROPE = {  # Llama 3.2's real values
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# name -> (transformers config class name, config keys). Together they cover every feature the bridge implements:
# each rope type (llama3, linear, yarn with and without mscale), tied embeddings, head_dim != hidden / heads,
# attention biases, q/k norms, MoE top-k with norm_topk_prob true and false.
CASES = {
    "llama3-rope-tied": ("LlamaConfig", dict(
        _COMMON, head_dim=32, max_position_embeddings=131072, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True,
    )),
    "llama-linear-rope-bias": ("LlamaConfig", dict(
        _COMMON, head_dim=16, max_position_embeddings=256, attention_bias=True, tie_word_embeddings=False,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    )),
    "qwen3-yarn": ("Qwen3Config", dict(
        _COMMON, head_dim=32, max_position_embeddings=128, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 32},
    )),
    "qwen3moe-norm-topk": ("Qwen3MoeConfig", dict(
        _COMMON, **_MOE, head_dim=32, max_position_embeddings=256, norm_topk_prob=True, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )),
    "qwen3moe-raw-topk-bias-tied-yarn": ("Qwen3MoeConfig", dict(
        _COMMON, **_MOE, head_dim=16, max_position_embeddings=128, norm_topk_prob=False, attention_bias=True,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
            "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 16, "truncate": False,
        },
    )),
}
CASES |= {
    "qwen2-window-never-acts": ("Qwen2Config", dict(
        _COMMON, max_position_embeddings=256, tie_word_embeddings=False, use_sliding_window=True, sliding_window=128,
        max_window_layers=1, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )),
    "mistral": ("MistralConfig", dict(
        _COMMON, head_dim=32, max_position_embeddings=256, sliding_window=4096, tie_word_embeddings=False,
    )),
    "mixtral": ("MixtralConfig", dict(
        _COMMON, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256, tie_word_embeddings=False,
        intermediate_size=32,
    )),
    # GLM-4.5's features scaled down: a leading dense layer, a shared expert, sigmoid routing with a score
    # correction bias and scaling, group-limited top-k, q/k norms, q/k/v biases, half the head rotated
    "glm4-moe": ("Glm4MoeConfig", dict(
        _COMMON, num_hidden_layers=3, head_dim=32, max_position_embeddings=256, tie_word_embeddings=False,
        first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
        n_shared_experts=1, moe_intermediate_size=32, routed_scaling_factor=2.5, norm_topk_prob=True,
        use_qk_norm=True, attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    )),
    "qwen3moe-mixed-dense": ("Qwen3MoeConfig", dict(
        _COMMON, **_MOE, num_hidden_layers=3, head_dim=16, max_position_embeddings=256, norm_topk_prob=True,
        mlp_only_layers=[1], tie_word_embeddings=False,
    )),
}
# DeepSeek-V3's features scaled down: multi-latent attention with a q LoRA and a yarn rope whose mscale_all_dim
# scales the softmax, a leading dense layer, a shared expert, sigmoid routing with 4 groups of which 2 are chosen
# (top-4 = 2 per group, as the real 8 groups / top-4 / top-8), scaling; and V2-Lite's shape: no q LoRA, default rope
_LATENT = dict(
    _COMMON, num_hidden_layers=3, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False,
    kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=32, first_k_dense_replace=1,
    n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=32, norm_topk_prob=True,
)
CASES |= {
    "deepseek-v3": ("DeepseekV3Config", dict(
        _LATENT, q_lora_rank=48, num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
            "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1,
        },
    )),
    "deepseek-v2-lite-shape": ("DeepseekV3Config", dict(
        _LATENT, q_lora_rank=None, num_experts_per_tok=2, n_group=1, topk_group=1, routed_scaling_factor=1.0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )),
}
MOE_CASES = tuple(name for name, (cls, _) in CASES.items() if cls in ("Qwen3MoeConfig", "MixtralConfig", "Glm4MoeConfig", "DeepseekV3Config"))
# transformers 5 holds some architectures' experts under other names than their checkpoints: as checkpoints name them
CHECKPOINT_NAMES = {
    "MixtralConfig": ((r"\.mlp\.experts\.(\d+)\.gate_proj\.", r".block_sparse_moe.experts.\1.w1."),
                      (r"\.mlp\.experts\.(\d+)\.up_proj\.", r".block_sparse_moe.experts.\1.w3."),
                      (r"\.mlp\.experts\.(\d+)\.down_proj\.", r".block_sparse_moe.experts.\1.w2.")),
}


def batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(2026)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen) for _ in range(BATCHES)]


def _randomize(model: nn.Module, gen: torch.Generator) -> None:
    """Weights with unit-scale outputs, norms around 1, small biases: attention that is not uniform, so that
    positions (rope) matter, and a router that spreads tokens."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=gen))
            elif name.endswith("bias"):
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))
            elif "embed" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
            else:
                param.copy_(1.5 * torch.randn(param.shape, generator=gen) / param.shape[-1] ** 0.5)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # routing leans on it: make it matter
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=gen))


def write_checkpoint(name: str, root: Path) -> Path:
    import transformers

    class_name, keys = CASES[name]
    config = getattr(transformers, class_name)(**keys)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    _randomize(model, torch.Generator().manual_seed(sum(map(ord, name))))
    path = root / name
    model.save_pretrained(path)
    return path


def _fused_experts(experts: nn.Module, name: str, args: tuple, output: torch.Tensor, record) -> None:
    """transformers 5 holds experts as fused 3-D weights (no nn.Linear per expert): rebuild each expert's
    inputs from the module's own inputs and weights, and check that the rebuilt output is the module's."""
    hidden, index, weights = args[:3]
    rebuilt = torch.zeros_like(hidden)
    for expert in range(experts.gate_up_proj.shape[0]):
        token, slot = torch.where(index == expert)
        if token.numel() == 0:
            continue
        x = hidden[token]
        gate, up = F.linear(x, experts.gate_up_proj[expert]).chunk(2, dim=-1)
        h = experts.act_fn(gate) * up
        for projection, value in (("gate_proj", x), ("up_proj", x), ("down_proj", h)):
            record(f"{name}.{expert}.{projection}.input_quantizer._amax", value)
        rebuilt.index_add_(0, token, F.linear(h, experts.down_proj[expert]) * weights[token, slot, None])
    hidden, intermediate = experts.down_proj.shape[1:]
    assert_equal_up_to_rounding(rebuilt, output, 2 * hidden + intermediate + 8)  # an expert MLP, then the sum


def activation_amax(path: Path, case: str) -> tuple[dict[str, float], torch.Tensor]:
    """transformers' forward of the checkpoint on `batches()`: max |input| of every linear (per expert), and of
    K and V as they enter attention (after q/k norm and rope), for multi-latent attention of the row the engines
    cache (the kv_a_layernorm'ed latent and the roped key part). -> (amax by HF quantizer name, logits)."""
    import transformers
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    amax: dict[str, float] = {}
    renames = CHECKPOINT_NAMES.get(CASES[case][0], ())

    def record(name: str, tensor: torch.Tensor) -> None:
        for pattern, replacement in renames:
            name = re.sub(pattern, replacement, name)
        amax[name] = max(amax.get(name, 0.0), tensor.detach().abs().max().item())

    def attention(module, query, key, value, *args, **kwargs):
        prefix = f"model.layers.{module.layer_idx}.self_attn"
        if hasattr(module, "kv_a_layernorm"):  # MLA: the cache row is [latent | roped key part], K's and V's
            for kv in "kv":
                record(f"{prefix}.{kv}_bmm_quantizer._amax", key[..., -module.qk_rope_head_dim :])
        else:
            record(f"{prefix}.k_bmm_quantizer._amax", key)
            record(f"{prefix}.v_bmm_quantizer._amax", value)
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, *args, **kwargs)

    def latent(name: str):
        prefix = name[: -len(".kv_a_layernorm")]

        def hook(module, args, out):
            for kv in "kv":
                record(f"{prefix}.{kv}_bmm_quantizer._amax", out)

        return hook

    AttentionInterface.register("dist_quant_oracle", attention)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="dist_quant_oracle").eval()
    for name, module in model.named_modules():
        if name.endswith(".gate") and isinstance(module, nn.Linear):
            continue  # a router: megatron's router is not a quantized linear
        if name.endswith(".kv_a_layernorm"):
            module.register_forward_hook(latent(name))
        if isinstance(module, nn.Linear):
            module.register_forward_pre_hook(lambda m, args, name=name: record(f"{name}.input_quantizer._amax", args[0]))
        elif hasattr(module, "gate_up_proj") and hasattr(module, "down_proj"):
            module.register_forward_hook(lambda m, args, out, name=name: _fused_experts(m, name, args, out, record))
    with torch.no_grad():
        logits = torch.cat([model(tokens).logits for tokens in batches()])
    return amax, logits
