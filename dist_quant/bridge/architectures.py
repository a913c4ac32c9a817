"""One table per Hugging Face architecture: the config.json keys it understands, the megatron-core settings they
become, and the mappings between Megatron and Hugging Face names. Shared pieces (attention, dense MLP, MoE) are
written once and composed; the bridge itself holds no per-architecture branches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from dist_quant.bridge.config import COMMON, HFConfig, Rule, inert, only, used
from dist_quant.bridge.mappings import (
    ColumnParallelMapping,
    GatedMLPMapping,
    Mapping,
    QKVMapping,
    RowParallelMapping,
)

LAYER, HF_LAYER = "decoder.layers.*", "model.layers.*"


@dataclass(frozen=True)
class Architecture:
    name: str
    keys: dict[str, Rule]
    qk_norm: bool = False
    moe: bool = False


# -- config keys -------------------------------------------------------------------------------------------
def _sliding_window(per_layer: bool) -> Callable:
    """transformers slides the window over every layer (Qwen3-MoE) or over the layers `layer_types` marks,
    by default those from `max_window_layers` on (Qwen3), and only with `use_sliding_window`."""

    def check(use, config: HFConfig, seq_len):
        if not use:
            return None
        window = config.raw.get("sliding_window")
        if window is None:
            return "use_sliding_window is set but sliding_window is not: the window size is unknown"
        layers = config.require("num_hidden_layers")
        if per_layer:
            types = config.raw.get("layer_types")
            first = config.get("max_window_layers", 0)
            sliding = [i for i in range(layers) if (types[i] == "sliding_attention" if types else i >= first)]
        else:
            sliding = list(range(layers))
        if not sliding:
            return None
        where = f"layers {sliding[0]}-{sliding[-1]}" if len(sliding) > 1 else f"layer {sliding[0]}"
        if seq_len is None:
            return (
                f"a {window}-token sliding window acts in {where} beyond {window} tokens; sliding attention is "
                "not implemented (give the calibration length to show the window never acts)"
            )
        if seq_len > window:
            return (
                f"a {window}-token sliding window acts in {where} on sequences of {seq_len} tokens; sliding "
                f"attention is not implemented (calibrate with --seq-len {window} or less)"
            )
        return None

    return check


def _layer_types(value, config: HFConfig, seq_len):
    layers = config.raw.get("num_hidden_layers")
    if not isinstance(value, list) or any(t not in ("full_attention", "sliding_attention") for t in value):
        return "expected a list of full_attention / sliding_attention"
    if len(value) != layers:
        return f"{len(value)} entries for {layers} layers"
    return None


DENSE_MLP = {"intermediate_size": used(int, "an integer (MLP width)", positive=True)}
LLAMA_KEYS = {
    **COMMON,
    **DENSE_MLP,
    "mlp_bias": only((False,), "biases in the MLP are not implemented"),
    "pretraining_tp": inert("transformers 5 ignores it; transformers 4 split the same products"),
}
QWEN3_KEYS = {
    **COMMON,
    **DENSE_MLP,
    "use_sliding_window": Rule("read: sliding attention, refused where it acts", _sliding_window(per_layer=True)),
    "sliding_window": used((int, type(None)), "an integer or null"),
    "max_window_layers": used((int, type(None)), "an integer or null"),
    "layer_types": Rule("read: which layers slide", _layer_types),
}
QWEN3_MOE_KEYS = {
    **COMMON,
    "intermediate_size": inert("the width of dense MLP layers, and every layer is MoE"),
    "use_sliding_window": Rule("read: sliding attention, refused where it acts", _sliding_window(per_layer=False)),
    "sliding_window": used((int, type(None)), "an integer or null"),
    "max_window_layers": inert("transformers' Qwen3-MoE slides every layer or none"),
    "num_experts": used(int, "an integer", positive=True),
    "num_local_experts": used(int, "an integer (num_experts, as transformers 5 writes it)", positive=True),
    "num_experts_per_tok": used(int, "an integer (top-k)", positive=True),
    "moe_intermediate_size": used(int, "an integer (expert width)", positive=True),
    "norm_topk_prob": used(bool, "true or false"),
    "decoder_sparse_step": only((1,), "MoE layers with dense layers in between are not implemented"),
    "mlp_only_layers": only(([],), "MoE layers with dense layers in between are not implemented"),
    "router_aux_loss_coef": inert("a training loss"),
    "output_router_logits": inert("what transformers returns, not what it computes"),
}

ARCHITECTURES = {
    a.name: a
    for a in (
        Architecture("LlamaForCausalLM", LLAMA_KEYS),
        Architecture("Qwen3ForCausalLM", QWEN3_KEYS, qk_norm=True),
        Architecture("Qwen3MoeForCausalLM", QWEN3_MOE_KEYS, qk_norm=True, moe=True),
    )
}


# -- mappings ----------------------------------------------------------------------------------------------
def attention_mappings(config: HFConfig, head_dim: int, qk_norm: bool) -> list[Mapping]:
    heads = config.require("num_attention_heads")
    groups = config.get("num_key_value_heads", heads)
    attention, hf = f"{LAYER}.self_attention", f"{HF_LAYER}.self_attn"
    table: list[Mapping] = [
        Mapping(f"{LAYER}.input_layernorm.weight", f"{HF_LAYER}.input_layernorm.weight"),
        QKVMapping(
            f"{attention}.linear_qkv.weight", tuple(f"{hf}.{p}_proj.weight" for p in "qkv"),
            num_heads=heads, num_groups=groups, head_dim=head_dim,
        ),
        RowParallelMapping(f"{attention}.linear_proj.weight", f"{hf}.o_proj.weight"),
    ]
    if config.get("attention_bias", False):
        table += [
            QKVMapping(
                f"{attention}.linear_qkv.bias", tuple(f"{hf}.{p}_proj.bias" for p in "qkv"),
                num_heads=heads, num_groups=groups, head_dim=head_dim,
            ),
            Mapping(f"{attention}.linear_proj.bias", f"{hf}.o_proj.bias"),  # added after the TP reduction
        ]
    if qk_norm:
        table += [
            Mapping(f"{attention}.q_layernorm.weight", f"{hf}.q_norm.weight"),
            Mapping(f"{attention}.k_layernorm.weight", f"{hf}.k_norm.weight"),
        ]
    return table


def dense_mlp_mappings() -> list[Mapping]:
    return [
        GatedMLPMapping(
            f"{LAYER}.mlp.linear_fc1.weight", (f"{HF_LAYER}.mlp.gate_proj.weight", f"{HF_LAYER}.mlp.up_proj.weight")
        ),
        RowParallelMapping(f"{LAYER}.mlp.linear_fc2.weight", f"{HF_LAYER}.mlp.down_proj.weight"),
    ]


def moe_mappings() -> list[Mapping]:
    experts, hf_experts = f"{LAYER}.mlp.experts.local_experts.*", f"{HF_LAYER}.mlp.experts.*"
    return [
        Mapping(f"{LAYER}.mlp.router.weight", f"{HF_LAYER}.mlp.gate.weight"),
        GatedMLPMapping(
            f"{experts}.linear_fc1.weight", (f"{hf_experts}.gate_proj.weight", f"{hf_experts}.up_proj.weight"), expert=True
        ),
        RowParallelMapping(f"{experts}.linear_fc2.weight", f"{hf_experts}.down_proj.weight", expert=True),
    ]


def model_mappings(architecture: Architecture, config: HFConfig, head_dim: int) -> list[Mapping]:
    table = [
        ColumnParallelMapping("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
        *attention_mappings(config, head_dim, architecture.qk_norm),
        Mapping(f"{LAYER}.pre_mlp_layernorm.weight", f"{HF_LAYER}.post_attention_layernorm.weight"),
        *(moe_mappings() if architecture.moe else dense_mlp_mappings()),
        Mapping("decoder.final_layernorm.weight", "model.norm.weight"),
    ]
    if not config.get("tie_word_embeddings", False):
        table.append(ColumnParallelMapping("output_layer.weight", "lm_head.weight"))
    return table


def megatron_shapes(architecture: Architecture, config: HFConfig, head_dim: int) -> dict[str, tuple[int, ...]]:
    """The full (unsharded) Megatron shape of every tensor the mapping table names, by its pattern."""
    hidden, vocab = config.require("hidden_size"), config.require("vocab_size")
    heads = config.require("num_attention_heads")
    groups = config.get("num_key_value_heads", heads)
    qkv = (heads + 2 * groups) * head_dim
    attention = f"{LAYER}.self_attention"
    shapes = {
        "embedding.word_embeddings.weight": (vocab, hidden),
        f"{LAYER}.input_layernorm.weight": (hidden,),
        f"{attention}.linear_qkv.weight": (qkv, hidden),
        f"{attention}.linear_qkv.bias": (qkv,),
        f"{attention}.linear_proj.weight": (hidden, heads * head_dim),
        f"{attention}.linear_proj.bias": (hidden,),
        f"{attention}.q_layernorm.weight": (head_dim,),
        f"{attention}.k_layernorm.weight": (head_dim,),
        f"{LAYER}.pre_mlp_layernorm.weight": (hidden,),
        "decoder.final_layernorm.weight": (hidden,),
        "output_layer.weight": (vocab, hidden),
    }
    if architecture.moe:
        experts, width = f"{LAYER}.mlp.experts.local_experts.*", config.require("moe_intermediate_size")
        count = config.get("num_experts") or config.require("num_local_experts")
        shapes |= {
            f"{LAYER}.mlp.router.weight": (count, hidden),
            f"{experts}.linear_fc1.weight": (2 * width, hidden),
            f"{experts}.linear_fc2.weight": (hidden, width),
        }
    else:
        width = config.require("intermediate_size")
        shapes |= {f"{LAYER}.mlp.linear_fc1.weight": (2 * width, hidden), f"{LAYER}.mlp.linear_fc2.weight": (hidden, width)}
    return shapes
