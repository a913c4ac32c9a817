"""One table per Hugging Face architecture over one shared config reader: the config.json keys it understands,
what its forward is in megatron-core's terms (`Forward`), and where its tensors live in checkpoints. Attention,
dense MLP and MoE mappings are written once and composed; the bridge itself holds no per-architecture branches."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from dist_quant.bridge.config import COMMON, MAX_COUNT, HFConfig, Rule, inert, only, rope_check, used
from dist_quant.bridge.mappings import (
    ColumnParallelMapping,
    GatedMLPMapping,
    Mapping,
    QKVMapping,
    RowParallelMapping,
)

LAYER, HF_LAYER = "decoder.layers.*", "model.layers.*"


@dataclass(frozen=True)
class Forward:
    """What a config's forward is, in the terms megatron and the mappings need."""

    qk_norm: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    moe_layers: tuple[int, ...] = ()  # the layers whose MLP is routed experts; the others are dense
    num_experts: int = 0
    shared_expert_width: int | None = None
    router: dict = field(default_factory=dict)  # megatron TransformerConfig keys of the routing


@dataclass(frozen=True)
class MoENames:
    """Where an architecture's MoE tensors are in its checkpoints."""

    block: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    router_bias: str | None = None
    shared: str | None = None


@dataclass(frozen=True)
class Architecture:
    name: str
    keys: dict[str, Rule]
    forward: Callable[[HFConfig], Forward]
    moe_names: MoENames = MoENames()
    partial_rotary: bool = False  # its transformers code rotates only the first part of each head
    # config.json keys set in exported checkpoints: what the export leaves out must not be announced
    export_overrides: dict = field(default_factory=dict)
    # Where its KV-cache scales go in a checkpoint, so that both engines load them. vLLM 0.33 takes either form
    # (model_loader/weight_utils.py maybe_remap_kv_scale_name). SGLang 0.5.23 remaps ModelOpt's
    # "proj" form (self_attn.k_proj.k_scale) in its llama.py / qwen3.py loaders (Mistral is llama.py) and drops
    # the "attn" form there; its qwen2.py, qwen3_moe.py, glm4_moe.py and mixtral.py loaders take only the "attn"
    # form (self_attn.attn.k_scale), dropping the other (Mixtral raises a KeyError on it).
    kv_scales: str = "proj"


# -- config keys -------------------------------------------------------------------------------------------
def _sliding_window(layers: Callable[[HFConfig, int], list[int]], window_key: str | None = None) -> Callable:
    """A sliding window acts on the `layers(config, num_layers)` beyond its size; refused where it acts at the
    calibration length. The rule sits on the key that turns it on: `use_sliding_window` with the size in
    `window_key`, or the size itself (window_key None)."""

    def check(value, config: HFConfig, seq_len):
        window = value if window_key is None else config.raw.get(window_key)
        if window_key is not None and not value:
            return None
        if window is None:
            return "use_sliding_window is set but sliding_window is not: the window size is unknown"
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            return f"the sliding window size must be a number of tokens above 0, not {window!r}"
        sliding = layers(config, config.require("num_hidden_layers"))
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


def _every_layer(config: HFConfig, layers: int) -> list[int]:
    return list(range(layers))


def _marked_layers(config: HFConfig, layers: int) -> list[int]:
    """Qwen2 / Qwen3: the layers `layer_types` marks, by default those from `max_window_layers` on."""
    types = config.raw.get("layer_types")
    first = config.get("max_window_layers", 0)
    return [i for i in range(layers) if (types[i] == "sliding_attention" if types else i >= first)]


def _layer_types(value, config: HFConfig, seq_len):
    layers = config.raw.get("num_hidden_layers")
    if not isinstance(value, list) or any(t not in ("full_attention", "sliding_attention") for t in value):
        return "expected a list of full_attention / sliding_attention"
    if len(value) != layers:
        return f"{len(value)} entries for {layers} layers"
    return None


def _layer_list(value, config: HFConfig, seq_len):
    layers = config.raw.get("num_hidden_layers", 0)
    if not isinstance(value, list) or not all(isinstance(i, int) and 0 <= i < layers for i in value):
        return f"expected a list of layer numbers below num_hidden_layers ({layers})"
    return None


def routed_experts(config: HFConfig) -> int:
    """The number of routed experts, under whichever key the architecture's config names it."""
    return config.get("num_experts") or config.get("n_routed_experts") or config.require("num_local_experts")


def _top_k(value, config: HFConfig, seq_len):
    experts = routed_experts(config)
    return f"expected at most the {experts} routed experts" if value > experts else None


def _group_limited(value, config: HFConfig, seq_len):
    """transformers scores each expert group by its top-2 experts; megatron-core by its top-(topk / groups
    chosen): the same where that is 2, or where there is one group (no limit at all). The top-k experts must
    come from the groups chosen: megatron-core masks the others out, transformers picks them at score 0."""
    groups, chosen, topk = value, config.get("topk_group", 1), config.get("num_experts_per_tok", 1)
    experts = routed_experts(config)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1 or experts % groups:
        return f"expected a number of groups that divides the {experts} experts"
    if groups > 1 and (not 1 <= chosen <= groups or topk // chosen != 2):
        return (
            f"group-limited routing with topk_group = {chosen} and top-{topk}: transformers scores groups by their "
            "top-2 experts, megatron-core by their top-(top-k / topk_group); implemented where that is 2"
        )
    if topk > chosen * (experts // groups):
        return (
            f"top-{topk} routing over topk_group = {chosen} of {groups} groups of {experts // groups} experts: "
            f"the groups chosen hold {chosen * (experts // groups)}"
        )
    return None


def _sigmoid_norm(value, config: HFConfig, seq_len):
    if value is not True:
        return "sigmoid routing without renormalized top-k weights is not implemented (megatron-core renormalizes)"
    if config.get("num_experts_per_tok", 2) < 2:
        return "top-1 sigmoid routing: megatron-core does not renormalize a single weight, transformers does"
    return None


DENSE_MLP = {"intermediate_size": used(int, "an integer (MLP width)", positive=True)}
QWEN_SLIDING = {
    "use_sliding_window": Rule(
        "read: sliding attention, refused where it acts", relation=_sliding_window(_marked_layers, "sliding_window")
    ),
    "sliding_window": used((int, type(None)), "an integer or null", positive=True),
    "max_window_layers": used((int, type(None)), "an integer or null"),
    "layer_types": Rule("read: which layers slide", _layer_types),
}
MISTRAL_SLIDING = {
    "sliding_window": Rule(
        "read: sliding attention on every layer, refused where it acts", relation=_sliding_window(_every_layer)
    ),
    "attention_bias": inert("Mistral's attention has no biases whatever the config says"),
}
MOE_TRAINING = {
    "router_aux_loss_coef": inert("a training loss"),
    "output_router_logits": inert("what transformers returns, not what it computes"),
}
TOPK = {"num_experts_per_tok": used(int, "an integer (top-k)", positive=True, relation=_top_k)}

LLAMA_KEYS = {
    **COMMON, **DENSE_MLP,
    "mlp_bias": only((False,), "biases in the MLP are not implemented"),
    "pretraining_tp": inert("transformers 5 ignores it; transformers 4 split the same products"),
}
QWEN2_KEYS = {
    **COMMON, **DENSE_MLP, **QWEN_SLIDING,
    "attention_bias": inert("Qwen2 always has q/k/v biases and no o_proj bias"),
}
QWEN3_KEYS = {**COMMON, **DENSE_MLP, **QWEN_SLIDING}
QWEN3_MOE_KEYS = {
    **COMMON, **DENSE_MLP, **MOE_TRAINING, **TOPK,
    "use_sliding_window": Rule(
        "read: sliding attention on every layer, refused where it acts",
        relation=_sliding_window(_every_layer, "sliding_window"),
    ),
    "sliding_window": used((int, type(None)), "an integer or null", positive=True),
    "max_window_layers": inert("transformers' Qwen3-MoE slides every layer or none"),
    "num_experts": used(int, "an integer", positive=True, at_most=MAX_COUNT),
    "num_local_experts": used(int, "an integer (num_experts, as transformers 5 writes it)", positive=True, at_most=MAX_COUNT),
    "moe_intermediate_size": used(int, "an integer (expert width)", positive=True),
    "norm_topk_prob": used(bool, "true or false"),
    "decoder_sparse_step": used(int, "an integer (every N-th layer is MoE)", positive=True),
    "mlp_only_layers": Rule("read: the dense layers", relation=_layer_list),
}
MISTRAL_KEYS = {**COMMON, **DENSE_MLP, **MISTRAL_SLIDING}
MIXTRAL_KEYS = {
    **COMMON, **MISTRAL_SLIDING, **MOE_TRAINING, **TOPK,
    "intermediate_size": used(int, "an integer (expert width)", positive=True),
    "num_local_experts": used(int, "an integer", positive=True, at_most=MAX_COUNT),
    "router_jitter_noise": inert("noise is added in training only"),
}
GLM4_MOE_KEYS = {
    **COMMON, **DENSE_MLP, **MOE_TRAINING, **TOPK,
    "partial_rotary_factor": Rule(
        "read: the rotated part of each head (with the rope)", rope_check("partial_rotary_factor")
    ),
    "use_qk_norm": used(bool, "true or false"),
    "first_k_dense_replace": used(int, "an integer (leading dense layers)", at_least=0),
    "n_routed_experts": used(int, "an integer", positive=True, at_most=MAX_COUNT),
    "num_local_experts": used(int, "an integer (n_routed_experts)", positive=True, at_most=MAX_COUNT),
    "n_shared_experts": used(int, "an integer (shared experts, summed into one MLP)", at_least=0),
    "moe_intermediate_size": used(int, "an integer (expert width)", positive=True),
    "routed_scaling_factor": used((float, int), "a number", positive=True),
    "norm_topk_prob": Rule("read: renormalized top-k sigmoid weights", relation=_sigmoid_norm),
    "n_group": Rule("read: group-limited routing", relation=_group_limited),
    "topk_group": used(int, "an integer (groups chosen)", positive=True),
    "num_nextn_predict_layers": inert("multi-token-prediction layers are outside the forward; their tensors are "
                                      "left out of the export, which then announces none"),
}


# -- forwards ----------------------------------------------------------------------------------------------
def _biases(config: HFConfig) -> dict:
    bias = bool(config.get("attention_bias", False))
    return {"qkv_bias": bias, "o_bias": bias}


def _softmax_router(normalized: bool) -> dict:
    # softmax over all experts then top-k: the top-k probabilities as they are; top-k then softmax: the top-k
    # probabilities renormalized to sum to 1 (= transformers' norm_topk_prob)
    return {"moe_router_pre_softmax": not normalized}


def _qwen3_moe(config: HFConfig) -> Forward:
    layers = config.require("num_hidden_layers")
    dense, step = set(config.get("mlp_only_layers", [])), config.get("decoder_sparse_step", 1)
    return Forward(
        qk_norm=True, **_biases(config),
        moe_layers=tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0),
        num_experts=routed_experts(config),
        router=_softmax_router(config.get("norm_topk_prob", False)),
    )


def _mixtral(config: HFConfig) -> Forward:
    return Forward(
        moe_layers=tuple(range(config.require("num_hidden_layers"))),
        num_experts=routed_experts(config),
        router=_softmax_router(True),  # softmax over the top-k logits
    )


def _glm4_moe(config: HFConfig) -> Forward:
    layers, groups = config.require("num_hidden_layers"), config.get("n_group", 1)
    shared = config.get("n_shared_experts", 0)
    router = {
        "moe_router_score_function": "sigmoid",
        "moe_router_enable_expert_bias": True,
        "moe_router_topk_scaling_factor": float(config.get("routed_scaling_factor", 1.0)),
        "moe_router_dtype": "fp32",  # transformers' router computes in float32
    }
    if groups > 1:
        router |= {"moe_router_num_groups": groups, "moe_router_group_topk": config.require("topk_group")}
    return Forward(
        qk_norm=bool(config.get("use_qk_norm", False)),
        qkv_bias=bool(config.get("attention_bias", False)),
        moe_layers=tuple(range(config.get("first_k_dense_replace", 0), layers)),
        num_experts=routed_experts(config),
        shared_expert_width=config.require("moe_intermediate_size") * shared if shared else None,
        router=router,
    )


ARCHITECTURES = {
    a.name: a
    for a in (
        Architecture("LlamaForCausalLM", LLAMA_KEYS, lambda c: Forward(**_biases(c))),
        Architecture("Qwen2ForCausalLM", QWEN2_KEYS, lambda c: Forward(qkv_bias=True), kv_scales="attn"),
        Architecture("Qwen3ForCausalLM", QWEN3_KEYS, lambda c: Forward(qk_norm=True, **_biases(c))),
        Architecture("Qwen3MoeForCausalLM", QWEN3_MOE_KEYS, _qwen3_moe, kv_scales="attn"),
        Architecture("MistralForCausalLM", MISTRAL_KEYS, lambda c: Forward()),
        Architecture(
            "MixtralForCausalLM", MIXTRAL_KEYS, _mixtral, MoENames("block_sparse_moe", "w1", "w3", "w2"), kv_scales="attn"
        ),
        Architecture(
            "Glm4MoeForCausalLM", GLM4_MOE_KEYS, _glm4_moe,
            MoENames(router_bias="gate.e_score_correction_bias", shared="shared_experts"),
            partial_rotary=True, export_overrides={"num_nextn_predict_layers": 0}, kv_scales="attn",
        ),
    )
}


# -- mappings and shapes -----------------------------------------------------------------------------------
def attention_mappings(config: HFConfig, forward: Forward, head_dim: int) -> list[Mapping]:
    heads = config.require("num_attention_heads")
    groups = config.get("num_key_value_heads", heads)
    attention, hf = f"{LAYER}.self_attention", f"{HF_LAYER}.self_attn"
    qkv = {"num_heads": heads, "num_groups": groups, "head_dim": head_dim}
    table: list[Mapping] = [
        Mapping(f"{LAYER}.input_layernorm.weight", f"{HF_LAYER}.input_layernorm.weight"),
        QKVMapping(f"{attention}.linear_qkv.weight", tuple(f"{hf}.{p}_proj.weight" for p in "qkv"), **qkv),
        RowParallelMapping(f"{attention}.linear_proj.weight", f"{hf}.o_proj.weight"),
        Mapping(f"{LAYER}.pre_mlp_layernorm.weight", f"{HF_LAYER}.post_attention_layernorm.weight"),
    ]
    if forward.qkv_bias:
        table.append(QKVMapping(f"{attention}.linear_qkv.bias", tuple(f"{hf}.{p}_proj.bias" for p in "qkv"), **qkv))
    if forward.o_bias:
        table.append(Mapping(f"{attention}.linear_proj.bias", f"{hf}.o_proj.bias"))  # added after the TP reduction
    if forward.qk_norm:
        table += [
            Mapping(f"{attention}.q_layernorm.weight", f"{hf}.q_norm.weight"),
            Mapping(f"{attention}.k_layernorm.weight", f"{hf}.k_norm.weight"),
        ]
    return table


def gated_mlp_mappings(megatron: str, hf: str, gate: str = "gate_proj", up: str = "up_proj", down: str = "down_proj",
                       expert: bool = False, layers: tuple[int, ...] | None = None) -> list[Mapping]:
    """linear_fc1 <-> (gate, up), linear_fc2 <-> down, under `megatron` / `hf` prefixes."""
    return [
        GatedMLPMapping(f"{megatron}.linear_fc1.weight", (f"{hf}.{gate}.weight", f"{hf}.{up}.weight"), expert=expert, layers=layers),
        RowParallelMapping(f"{megatron}.linear_fc2.weight", f"{hf}.{down}.weight", expert=expert, layers=layers),
    ]


def mlp_mappings(architecture: Architecture, forward: Forward, num_layers: int) -> list[Mapping]:
    moe = forward.moe_layers
    dense = tuple(i for i in range(num_layers) if i not in moe)
    table = gated_mlp_mappings(f"{LAYER}.mlp", f"{HF_LAYER}.mlp", layers=dense) if dense else []
    if not moe:
        return table
    names, block = architecture.moe_names, f"{HF_LAYER}.{architecture.moe_names.block}"
    table.append(Mapping(f"{LAYER}.mlp.router.weight", f"{block}.gate.weight", layers=moe))
    table += gated_mlp_mappings(
        f"{LAYER}.mlp.experts.local_experts.*", f"{block}.experts.*", names.gate, names.up, names.down, True, moe
    )
    if names.router_bias:
        table.append(Mapping(f"{LAYER}.mlp.router.expert_bias", f"{block}.{names.router_bias}", layers=moe))
    if forward.shared_expert_width:
        table += gated_mlp_mappings(f"{LAYER}.mlp.shared_experts", f"{block}.{names.shared}", layers=moe)
    return table


def model_mappings(architecture: Architecture, config: HFConfig, forward: Forward, head_dim: int) -> list[Mapping]:
    table = [
        ColumnParallelMapping("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
        *attention_mappings(config, forward, head_dim),
        *mlp_mappings(architecture, forward, config.require("num_hidden_layers")),
        Mapping("decoder.final_layernorm.weight", "model.norm.weight"),
    ]
    if config.get("tie_word_embeddings", False):
        # with pipeline stages, the last one holds its own copy of the embedding as the output layer's weight
        table.append(ColumnParallelMapping("output_layer.weight", "model.embed_tokens.weight", exported=False))
    else:
        table.append(ColumnParallelMapping("output_layer.weight", "lm_head.weight"))
    return table


def parameter_counts(architecture: Architecture, config: HFConfig, forward: Forward, head_dim: int) -> dict[str, int]:
    """The parameters of the unquantized Hugging Face checkpoint, by the Hugging Face names of each exported mapping
    (over its layers and experts), multiplied out from the shapes without listing a name: a config that describes
    trillions is weighed before anything counts them out. They sum to `hf_tensor_shapes`' elements."""
    shapes = megatron_shapes(config, forward, head_dim)
    layers, counts = config.require("num_hidden_layers"), {}
    for mapping in filter(lambda m: m.exported, model_mappings(architecture, config, forward, head_dim)):
        repeats = (layers if mapping.layers is None else len(mapping.layers), forward.num_experts)
        counts[", ".join(mapping.hf)] = math.prod((*shapes[mapping.megatron], *repeats[: mapping.megatron.count("*")]))
    return counts


def megatron_shapes(config: HFConfig, forward: Forward, head_dim: int) -> dict[str, tuple[int, ...]]:
    """The full (unsharded) Megatron shape of every tensor the mapping table names, by its pattern."""
    hidden, vocab = config.require("hidden_size"), config.require("vocab_size")
    heads = config.require("num_attention_heads")
    groups = config.get("num_key_value_heads", heads)
    qkv = (heads + 2 * groups) * head_dim
    attention = f"{LAYER}.self_attention"

    def mlp(prefix: str, width: int) -> dict:
        return {f"{prefix}.linear_fc1.weight": (2 * width, hidden), f"{prefix}.linear_fc2.weight": (hidden, width)}

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
        **(mlp(f"{LAYER}.mlp", config.require("intermediate_size")) if len(forward.moe_layers) < config.require("num_hidden_layers") else {}),
    }
    if forward.moe_layers:
        width = config.get("moe_intermediate_size") or config.require("intermediate_size")
        shapes |= {
            f"{LAYER}.mlp.router.weight": (forward.num_experts, hidden),
            f"{LAYER}.mlp.router.expert_bias": (forward.num_experts,),
            **mlp(f"{LAYER}.mlp.experts.local_experts.*", width),
            **(mlp(f"{LAYER}.mlp.shared_experts", forward.shared_expert_width) if forward.shared_expert_width else {}),
        }
    return shapes
