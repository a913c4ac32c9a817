"""One table per Hugging Face architecture over one shared config reader: the config.json keys it understands,
what its forward is in megatron-core's terms (`Forward`), and where its tensors live in checkpoints. Attention,
dense MLP and MoE mappings are written once and composed; the bridge itself holds no per-architecture branches."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from dist_quant.bridge.config import COMMON, MAX_COUNT, ROPE_KEYS, HFConfig, Rule, inert, only, rope_check, used
from dist_quant.bridge.mappings import (
    ColumnParallelMapping,
    GatedMLPMapping,
    Mapping,
    QKVMapping,
    RowParallelMapping,
)

LAYER, HF_LAYER = "decoder.layers.*", "model.layers.*"


@dataclass(frozen=True)
class LatentAttention:
    """DeepSeek's multi-latent attention (MLA): the query through a low-rank q_a_proj / q_a_layernorm / q_b_proj
    (q_proj where `q_lora_rank` is None), and every head's key and value from one compressed latent of
    `kv_lora_rank` channels (kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj) plus one rotated key part of
    `qk_rope_head_dim` channels shared by all heads. megatron-core's MLASelfAttention computes the same."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class Forward:
    """What a config's forward is, in the terms megatron and the mappings need."""

    latent: LatentAttention | None = None  # multi-latent attention in place of (grouped) q/k/v heads
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

# DeepSeek-V3's routing and MoE are GLM-4.5's (the same keys, read the same way)
SIGMOID_MOE = {k: GLM4_MOE_KEYS[k] for k in (
    *MOE_TRAINING, *TOPK, "first_k_dense_replace", "n_routed_experts", "num_local_experts", "n_shared_experts",
    "moe_intermediate_size", "routed_scaling_factor", "norm_topk_prob", "n_group", "topk_group",
    "num_nextn_predict_layers",
)}


def _equal_to(derived: Callable[[HFConfig], object], what: str) -> Callable:
    """A key transformers writes though it follows from others: it must be what they give."""

    def relation(value, config: HFConfig, seq_len):
        expected = derived(config)
        return None if value == expected else f"expected {expected} ({what})"

    return relation


def _latent_width(key: str) -> Rule:
    return used(int, f"an integer ({key.replace('_', ' ')})", positive=True)


def _latent_rope(key: str) -> Rule:
    """The rope, and on top: megatron-core's MLA multiplies cos and sin by no yarn attention factor, so a yarn
    rope whose mscale and mscale_all_dim differ (a factor other than 1) is refused; DeepSeek-V3, V2-Lite and
    Kimi-K2 set them equal."""
    common = COMMON[key]

    def check(value, config: HFConfig, seq_len):
        problem = common.problem(value, config, seq_len)
        owner = next((k for k in ROPE_KEYS if config.raw.get(k) is not None), None)
        if problem or key != owner or config.rope.attention_factor() == 1.0:
            return problem
        return (
            f"a yarn rope whose mscale and mscale_all_dim differ multiplies cos and sin by "
            f"{config.rope.attention_factor():.6g}, which megatron-core's multi-latent attention does not"
        )

    return Rule(common.note, check)


def _latent_norm_eps(value, config: HFConfig, seq_len):
    if value != 1e-6:
        return (
            "transformers' DeepSeek-V3 normalizes the q and kv latents with eps 1e-6 whatever rms_norm_eps says, "
            "vLLM and SGLang with rms_norm_eps: only 1e-6 is computed alike"
        )
    return None


DEEPSEEK_V3_KEYS = {
    **COMMON, **DENSE_MLP, **SIGMOID_MOE,
    **{key: _latent_rope(key) for key in ROPE_KEYS},
    "rms_norm_eps": used((float, int), "a number", positive=True, relation=_latent_norm_eps),
    "num_attention_heads": used(int, "an integer", positive=True),
    "num_key_value_heads": used(int, "an integer", positive=True, relation=_equal_to(
        lambda c: c.get("num_attention_heads"),
        "num_attention_heads: MLA gives every head its own key and value, and transformers' eager attention repeats "
        "them num_attention_heads / num_key_value_heads times",
    )),
    "head_dim": used(int, "an integer", positive=True, relation=_equal_to(
        lambda c: c.get("qk_rope_head_dim"), "qk_rope_head_dim, the rotated channels, as transformers sets it"
    )),
    "qk_head_dim": used(int, "an integer", positive=True, relation=_equal_to(
        lambda c: c.get("qk_nope_head_dim", 0) + c.get("qk_rope_head_dim", 0), "qk_nope_head_dim + qk_rope_head_dim"
    )),
    "q_lora_rank": used((int, type(None)), "an integer or null (no query compression: q_proj)", positive=True),
    "kv_lora_rank": _latent_width("kv_lora_rank"),
    "qk_nope_head_dim": _latent_width("qk_nope_head_dim"),
    "qk_rope_head_dim": used(int, "an even integer (rotated key/query channels)", positive=True, relation=(
        lambda value, config, seq_len: "rotary embeddings turn channels in pairs: expected an even number" if value % 2 else None
    )),
    "v_head_dim": _latent_width("v_head_dim"),
    "attention_bias": only((False,), "biases on q_a_proj, kv_a_proj_with_mqa and o_proj are not implemented "
                                     "(megatron-core's MLA has none)"),
    "rope_interleave": only((True,), "rope channels laid out in halves: megatron-core's MLA, vLLM and SGLang rotate "
                                    "DeepSeek's interleaved pairs"),
    "topk_method": only(("noaux_tc",), "transformers' DeepSeek-V3 routes as noaux_tc (sigmoid scores, the score "
                                      "correction bias, group-limited top-k) whatever the key says; the engines follow the key"),
    "scoring_func": only(("sigmoid",), "transformers' DeepSeek-V3 scores experts with a sigmoid whatever the key "
                                      "says; the engines follow the key"),
    "moe_layer_freq": only((1,), "every layer after first_k_dense_replace is MoE in transformers' DeepSeek-V3"),
    "aux_loss_alpha": inert("a training loss"),
    "seq_aux": inert("a training loss"),
    "ep_size": inert("the expert-parallel degree of DeepSeek's own training code"),
    "pretraining_tp": inert("transformers 5 ignores it"),
    "auto_map": inert("DeepSeek's own modeling code, which transformers' built-in DeepSeek-V3 replaces and which "
                      "dist_quant does not run; the fidelity tests hold the bridge to transformers' code"),
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


def _sigmoid_moe(config: HFConfig, **attention) -> Forward:
    """GLM-4.5 and DeepSeek-V3's MLP: dense first_k_dense_replace layers, then routed experts scored by a sigmoid
    with a correction bias, group-limited top-k, scaled weights, and shared experts summed into one MLP."""
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
        **attention,
        moe_layers=tuple(range(config.get("first_k_dense_replace", 0), layers)),
        num_experts=routed_experts(config),
        shared_expert_width=config.require("moe_intermediate_size") * shared if shared else None,
        router=router,
    )


def _glm4_moe(config: HFConfig) -> Forward:
    return _sigmoid_moe(
        config, qk_norm=bool(config.get("use_qk_norm", False)), qkv_bias=bool(config.get("attention_bias", False))
    )


def _deepseek_v3(config: HFConfig) -> Forward:
    latent = LatentAttention(
        config.get("q_lora_rank"), config.require("kv_lora_rank"), config.require("qk_nope_head_dim"),
        config.require("qk_rope_head_dim"), config.require("v_head_dim"),
    )
    return _sigmoid_moe(config, latent=latent)


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
        Architecture(
            "DeepseekV3ForCausalLM", DEEPSEEK_V3_KEYS, _deepseek_v3,
            MoENames(router_bias="gate.e_score_correction_bias", shared="shared_experts"),
            export_overrides={"num_nextn_predict_layers": 0},
        ),
    )
}


# -- mappings and shapes -----------------------------------------------------------------------------------
def latent_attention_mappings(latent: LatentAttention) -> list[Mapping]:
    """MLA: megatron's column-parallel down projections split their rows over TP (each rank computes part of the
    latent and megatron gathers it), the up projections and o_proj split heads as usual; the norms are whole."""
    attention, hf = f"{LAYER}.self_attention", f"{HF_LAYER}.self_attn"
    if latent.q_lora_rank is None:
        query = [ColumnParallelMapping(f"{attention}.linear_q_proj.weight", f"{hf}.q_proj.weight")]
    else:
        query = [
            ColumnParallelMapping(f"{attention}.linear_q_down_proj.weight", f"{hf}.q_a_proj.weight"),
            Mapping(f"{attention}.q_layernorm.weight", f"{hf}.q_a_layernorm.weight"),
            ColumnParallelMapping(f"{attention}.linear_q_up_proj.weight", f"{hf}.q_b_proj.weight"),
        ]
    return [
        Mapping(f"{LAYER}.input_layernorm.weight", f"{HF_LAYER}.input_layernorm.weight"),
        *query,
        ColumnParallelMapping(f"{attention}.linear_kv_down_proj.weight", f"{hf}.kv_a_proj_with_mqa.weight"),
        Mapping(f"{attention}.kv_layernorm.weight", f"{hf}.kv_a_layernorm.weight"),
        ColumnParallelMapping(f"{attention}.linear_kv_up_proj.weight", f"{hf}.kv_b_proj.weight"),
        RowParallelMapping(f"{attention}.linear_proj.weight", f"{hf}.o_proj.weight"),
        Mapping(f"{LAYER}.pre_mlp_layernorm.weight", f"{HF_LAYER}.post_attention_layernorm.weight"),
    ]


def attention_mappings(config: HFConfig, forward: Forward, head_dim: int) -> list[Mapping]:
    if forward.latent is not None:
        return latent_attention_mappings(forward.latent)
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

    latent = forward.latent
    if latent is not None:
        rank, heads_qk = latent.q_lora_rank, heads * latent.qk_head_dim
        shapes = {
            f"{attention}.linear_q_proj.weight": (heads_qk, hidden),
            f"{attention}.linear_q_down_proj.weight": (rank, hidden),
            f"{attention}.q_layernorm.weight": (rank,),
            f"{attention}.linear_q_up_proj.weight": (heads_qk, rank),
            f"{attention}.linear_kv_down_proj.weight": (latent.kv_lora_rank + latent.qk_rope_head_dim, hidden),
            f"{attention}.kv_layernorm.weight": (latent.kv_lora_rank,),
            f"{attention}.linear_kv_up_proj.weight": (heads * (latent.qk_nope_head_dim + latent.v_head_dim), latent.kv_lora_rank),
            f"{attention}.linear_proj.weight": (hidden, heads * latent.v_head_dim),
        }
    else:
        shapes = {
            f"{attention}.linear_qkv.weight": (qkv, hidden),
            f"{attention}.linear_qkv.bias": (qkv,),
            f"{attention}.linear_proj.weight": (hidden, heads * head_dim),
            f"{attention}.linear_proj.bias": (hidden,),
            f"{attention}.q_layernorm.weight": (head_dim,),
            f"{attention}.k_layernorm.weight": (head_dim,),
        }
    shapes |= {
        "embedding.word_embeddings.weight": (vocab, hidden),
        f"{LAYER}.input_layernorm.weight": (hidden,),
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
