"""Model bridges: from a Hugging Face `config.json`, read through its architecture's key table, to a megatron-core
model (config and local layer spec) computing what transformers computes, and the table of mappings between
their names."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

import itertools
import re

from dist_quant.bridge.architectures import ARCHITECTURES, Architecture, Forward, megatron_shapes, model_mappings
from dist_quant.bridge.config import HFConfig
from dist_quant.bridge.mappings import BridgeError, Mapping, kv_bmm_mappings
from dist_quant.bridge.registry import MappingRegistry
from dist_quant.modules.megatron import group_experts, sdpa_attention
from dist_quant.quantizer import TensorQuantizer


def read_config(config: dict | str | os.PathLike) -> dict:
    """A config dict, a `config.json`, or a checkpoint directory holding one."""
    if isinstance(config, dict):
        return config
    path = Path(config)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise BridgeError(f"{path}: no such config.json")
    try:
        raw = json.loads(path.read_text())
    except RecursionError:
        raise BridgeError(f"{path}: not a JSON config (nested too deep to read)") from None
    except ValueError as error:  # not UTF-8, not JSON, or an integer of more digits than Python converts
        raise BridgeError(f"{path}: not a JSON config ({error})") from None
    if not isinstance(raw, dict):
        raise BridgeError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


# keys transformers writes about the file, not the model
BOOKKEEPING = ("_name_or_path", "transformers_version")


def with_transformers_defaults(raw: dict, known) -> dict:
    """config.json as transformers reads it: a key the file leaves out takes the value transformers' config class
    of its `model_type` gives it (a default, or one derived from other keys), which is the model transformers and
    the engines build (a Qwen3 without head_dim has heads of 128, a Mixtral without rope_theta a base of 1e6, a
    GLM-4-MoE without partial_rotary_factor rotates half of each head). Filled: the keys of the architecture's
    table (`known`) that transformers gives a scalar value, and the rope base and rotated fraction, which
    transformers 5 keeps in rope_parameters; nothing for a config without a model_type transformers knows."""
    import transformers

    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in transformers.CONFIG_MAPPING:  # lazy: no .get
        return raw
    resolved = transformers.CONFIG_MAPPING[model_type](**raw).to_dict()
    rope = resolved.get("rope_parameters") if isinstance(resolved.get("rope_parameters"), dict) else {}
    has_rope = any(raw.get(k) is not None for k in ("rope_scaling", "rope_parameters"))
    filled = dict(raw)
    for key in known:
        value = resolved.get(key)
        if key in ("rope_theta", "partial_rotary_factor") and not has_rope:
            value = rope.get(key, value)
        if raw.get(key) is None and isinstance(value, (bool, int, float, str)) and key not in BOOKKEEPING:
            filled[key] = value
    return filled


@dataclass(frozen=True)
class PipelineSplit:
    """How the layers are split over pipeline stages: evenly, or with `first` / `last` layers on the first / last
    stage and the rest even over the others (megatron-core's uneven split)."""

    stages: int = 1
    first: int | None = None
    last: int | None = None

    def problem(self, layers: int) -> str | None:
        if self.stages == 1:
            return None if self.first is None and self.last is None else "first/last stage layers need PP > 1"
        ends = [n for n in (self.first, self.last) if n is not None]
        if any(n < 1 for n in ends) or sum(ends) > layers:
            return f"first/last stage layers {self.first}/{self.last} do not fit {layers} layers"
        middle, rest = self.stages - len(ends), layers - sum(ends)
        if middle == 0 and rest:
            return f"the first/last stage layers {self.first}/{self.last} leave {rest} of {layers} layers to no stage"
        if middle and (rest < middle or rest % middle):
            split = f"{rest} layers" + (f" (of {layers}, less the first/last stage's)" if ends else "")
            return f"{split} do not split evenly over {middle} pipeline stages (PP={self.stages})"
        return None


@dataclass
class ModelBridge:
    """What one HF architecture needs: megatron config and spec, and the mapping table."""

    hf_config: dict
    config: HFConfig = field(init=False, repr=False)

    def __post_init__(self):
        self.config = HFConfig(self.hf_config, self.spec.keys, self.architecture, self.spec.partial_rotary)

    @classmethod
    def from_hf(cls, config: dict | str | os.PathLike, seq_len: int | None = None) -> "ModelBridge":
        """From a config dict, a `config.json`, or a checkpoint directory holding one. Every key is checked
        against the architecture's table (BridgeError, one line, at the first it cannot honour); `seq_len`, the
        longest sequence that will run, lets keys that act only beyond some length (sliding windows) pass."""
        raw = read_config(config)
        architectures = raw.get("architectures") or []
        supported = [a for a in architectures if a in ARCHITECTURES]
        if not supported:
            raise BridgeError(f"architectures {architectures} not supported; supported: {', '.join(ARCHITECTURES)}")
        bridge = cls(dict(raw, architectures=supported))
        bridge.config.validate(seq_len)
        filled = with_transformers_defaults(bridge.hf_config, bridge.spec.keys)
        if len(filled) == len(bridge.hf_config):
            return bridge
        bridge = cls(filled)
        try:
            bridge.config.validate(seq_len)
        except BridgeError as error:
            named = [key for key in sorted(filled.keys() - raw.keys()) if f" {key} = " in str(error)]
            if not named:
                raise
            raise BridgeError(f"{error} (config.json leaves out {named[0]}: this is transformers' value for it)") from None
        return bridge

    # -- what the config says ----------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        return self.hf_config["architectures"][0]

    @property
    def spec(self) -> Architecture:
        return ARCHITECTURES[self.architecture]

    @functools.cached_property
    def forward(self) -> Forward:
        """What the forward is, in megatron-core's terms."""
        return self.spec.forward(self.config)

    @property
    def moe(self) -> bool:
        return bool(self.forward.moe_layers)

    @property
    def qk_norm(self) -> bool:
        return self.forward.qk_norm

    def kv_scale_name(self, attention: str, kind: str) -> str:
        """The checkpoint name of the K ("k") or V ("v") cache scale of an HF attention module
        (`model.layers.N.self_attn`): see `Architecture.kv_scales`."""
        return f"{attention}.{kind}_proj.{kind}_scale" if self.spec.kv_scales == "proj" else f"{attention}.attn.{kind}_scale"

    def kv_scale_of(self, amax: str) -> str:
        """The checkpoint name of the cache scale a K/V BMM amax stands for: `<attention>.k_bmm_quantizer._amax`
        (the HF side of `kv_bmm_mappings`) -> `kv_scale_name(<attention>, "k")`."""
        attention, quantizer, _ = amax.rsplit(".", 2)
        return self.kv_scale_name(attention, quantizer.removesuffix("_bmm_quantizer"))

    def kv_scale_names(self) -> set[str]:
        """Every K/V cache scale name a checkpoint of this config can hold (one per attention, K and V): those of
        the K/V BMM amax the mappings give (`kv_bmm_mappings`)."""
        layers = range(self.config.require("num_hidden_layers"))
        names = set()
        for mapping in self.mappings():
            for kv in kv_bmm_mappings(mapping):
                for layer in (layers if mapping.layers is None else mapping.layers) if "*" in kv.megatron else [None]:
                    (amax,) = kv.hf_names([] if layer is None else [str(layer)])
                    names.add(self.kv_scale_of(amax))
        return names

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    @property
    def dtype(self) -> torch.dtype:
        """The checkpoint's dtype: the default compute dtype, and the dtype of unquantized exported tensors."""
        return self.config.dtype

    @property
    def head_dim(self) -> int:
        return self.config.get("head_dim") or self.config.require("hidden_size") // self.config.require("num_attention_heads")

    @property
    def num_experts(self) -> int:
        return self.forward.num_experts if self.moe else 0

    def outside_forward(self, name: str) -> bool:
        """A checkpoint tensor of a multi-token-prediction layer (numbered after the decoder's layers): not part
        of the forward, so neither loaded nor exported."""
        match = re.match(r"model\.layers\.(\d+)\.", name)
        layers = self.config.require("num_hidden_layers")
        return bool(match) and layers <= int(match.group(1)) < layers + self.config.get("num_nextn_predict_layers", 0)

    def exported_config(self) -> dict:
        """config.json of an exported checkpoint (before its quantization_config)."""
        return {**self.hf_config, **self.spec.export_overrides}

    # -- megatron side -----------------------------------------------------------------------------------
    def check_layout(self, tp: int = 1, ep: int = 1, pipeline: PipelineSplit = PipelineSplit(), etp: int | None = None) -> None:
        """BridgeError unless TP splits the query groups, the vocabulary (megatron pads none) and the MLP widths,
        EP the experts, ETP (default TP) the experts' width, and the pipeline the layers."""
        c, etp = self.config, tp if etp is None else etp
        groups = c.get("num_key_value_heads", c.require("num_attention_heads"))
        if groups % tp:
            raise BridgeError(f"num_key_value_heads={groups} is not divisible by TP={tp}")
        if self.moe and self.num_experts % ep:
            raise BridgeError(f"num_experts={self.num_experts} is not divisible by EP={ep}")
        widths = [("vocab_size", c.require("vocab_size"), "TP", tp)]
        if len(self.forward.moe_layers) < c.require("num_hidden_layers"):
            widths.append(("intermediate_size", c.require("intermediate_size"), "TP", tp))
        if self.moe:
            expert_width = "moe_intermediate_size" if c.get("moe_intermediate_size") else "intermediate_size"
            widths.append((expert_width, c.require(expert_width), "ETP", etp))
        if self.forward.shared_expert_width:
            widths.append(("the shared experts' width", self.forward.shared_expert_width, "TP", tp))
        latent = self.forward.latent
        if latent is not None:  # megatron's MLA splits the rows of its down projections over TP
            if latent.q_lora_rank is not None:
                widths.append(("q_lora_rank", latent.q_lora_rank, "TP", tp))
            widths.append(("kv_lora_rank + qk_rope_head_dim", latent.kv_lora_rank + latent.qk_rope_head_dim, "TP", tp))
        for name, width, split, size in widths:
            if width % size:
                raise BridgeError(f"{name}={width} is not divisible by {split}={size}")
        problem = pipeline.problem(self.config.require("num_hidden_layers"))
        if problem:
            raise BridgeError(problem)

    def transformer_config(
        self, tp: int = 1, ep: int = 1, etp: int | None = None, dtype: torch.dtype | None = None,
        pipeline: PipelineSplit = PipelineSplit(), on_gpu: bool = False,
    ):
        from megatron.core.transformer import MLATransformerConfig, TransformerConfig

        c, f = self.config, self.forward
        heads = c.require("num_attention_heads")
        groups = c.get("num_key_value_heads", heads)
        layers = c.require("num_hidden_layers")
        self.check_layout(tp, ep, pipeline, etp)
        expert_width = c.get("moe_intermediate_size") or c.require("intermediate_size")
        moe = (
            dict(
                num_moe_experts=f.num_experts,
                moe_layer_freq=[int(i in f.moe_layers) for i in range(layers)],
                moe_router_topk=c.require("num_experts_per_tok"),
                moe_ffn_hidden_size=expert_width,
                moe_shared_expert_intermediate_size=f.shared_expert_width,
                moe_token_dispatcher_type="allgather",
                moe_aux_loss_coeff=0.0,
                expert_model_parallel_size=ep,
                expert_tensor_parallel_size=tp if etp is None else etp,
                **f.router,
            )
            if self.moe
            else {}
        )
        latent = f.latent
        attention = (
            dict(
                q_lora_rank=latent.q_lora_rank, kv_lora_rank=latent.kv_lora_rank, qk_head_dim=latent.qk_nope_head_dim,
                qk_pos_emb_head_dim=latent.qk_rope_head_dim, v_head_dim=latent.v_head_dim,
                # the plain rotary embedding, whose frequencies `build` sets as transformers has them (its yarn
                # frequencies included); the softmax scale too is set there. kv_channels: the value head, which
                # megatron's local attention takes as the size of each head's output.
                rope_type="rope", rotary_base=c.rope.theta, kv_channels=latent.v_head_dim, qk_layernorm=True,
            )
            if latent is not None
            else dict(kv_channels=self.head_dim, qk_layernorm=self.qk_norm)
        )
        config = (MLATransformerConfig if latent is not None else TransformerConfig)(
            num_layers=layers,
            hidden_size=c.require("hidden_size"),
            ffn_hidden_size=c.get("intermediate_size") or expert_width,
            num_attention_heads=heads,
            num_query_groups=groups,
            gated_linear_unit=True,
            activation_func=torch.nn.functional.silu,
            add_bias_linear=False,
            add_qkv_bias=f.qkv_bias,
            normalization="RMSNorm",
            layernorm_epsilon=c.require("rms_norm_eps"),
            hidden_dropout=0.0,
            attention_dropout=0.0,
            use_cpu_initialization=not on_gpu,
            params_dtype=dtype or self.dtype,
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pipeline.stages,
            pipeline_dtype=dtype or self.dtype,
            num_layers_in_first_pipeline_stage=pipeline.first,
            num_layers_in_last_pipeline_stage=pipeline.last,
            **attention,
            **moe,
        )
        # megatron reads the factor it multiplies cos and sin by (yarn) off these config attributes
        for name, value in c.rope.megatron_attributes().items():
            setattr(config, name, value)
        return config

    def build(
        self, tp: int = 1, ep: int = 1, etp: int | None = None, dtype: torch.dtype | None = None,
        pipeline: PipelineSplit = PipelineSplit(), device: torch.device | None = None,
    ):
        """A megatron-core GPTModel (local layer spec; its core attention `SdpaDotProductAttention` but for MLA, its
        MoE layers' experts grouped: `GroupedExperts`) for this rank: with pipeline stages, this rank's stage (its
        layers under their global numbers). megatron's parallel state must be set. `device` CUDA: the parameters
        are allocated and drawn on the current GPU by megatron's GPU initialization (a 30B model never passes
        through host memory); otherwise on the CPU."""
        from megatron.core import parallel_state
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
        from megatron.core.transformer.identity_op import IdentityOp

        dtype = dtype or self.dtype
        on_gpu = device is not None and device.type == "cuda"
        config = self.transformer_config(tp, ep, etp, dtype, pipeline, on_gpu)
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
        latent = self.forward.latent
        for layer in spec.layer_specs:  # dense and MoE layers have their own specs
            layer.submodules.self_attention.submodules.core_attention = sdpa_attention()
            if self.forward.o_bias:  # o_proj has a bias, the MLP none
                layer.submodules.self_attention.submodules.linear_proj = _biased_row_parallel_linear()
            if latent is not None:
                layer.submodules.self_attention.module = _latent_self_attention()
                attention = layer.submodules.self_attention.submodules
                attention.core_attention = _latent_dot_product_attention()
                if latent.q_lora_rank is None:  # no query latent to normalize (megatron 0.19 refuses a norm there)
                    attention.q_layernorm = IdentityOp
        rope = self.config.rope
        model = GPTModel(
            config,
            spec,
            vocab_size=self.config.require("vocab_size"),
            max_sequence_length=self.config.require("max_position_embeddings"),
            position_embedding_type="rope",
            rotary_percent=rope.partial_rotary_factor,
            rotary_base=rope.theta,
            share_embeddings_and_output_weights=self.tied,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
        )
        if latent is None:
            model.rotary_pos_emb.inv_freq = rope.inv_freq(self.head_dim)  # every rope type, as transformers has it
        for module in model.modules() if latent is not None else ():  # MLA: a rotary embedding in every layer
            if hasattr(module, "linear_kv_down_proj"):
                module.rotary_pos_emb.inv_freq = rope.inv_freq(latent.qk_rope_head_dim)
                module.core_attention.softmax_scale = rope.latent_softmax_scale(latent.qk_head_dim)
        # megatron's local spec builds norms in float32 whatever params_dtype says; its router keeps expert
        # biases in float32 (routing decisions hang on them), as transformers does
        model.to(device=device if on_gpu else None, dtype=dtype)  # norms and rope buffers megatron made on the CPU
        for module in model.modules():
            if getattr(module, "expert_bias", None) is not None:
                module.expert_bias.data = module.expert_bias.data.float()
        group_experts(model)
        return model

    # -- names -------------------------------------------------------------------------------------------
    def mappings(self) -> list[Mapping]:
        return model_mappings(self.spec, self.config, self.forward, self.head_dim)

    def hf_tensor_shapes(self) -> dict[str, torch.Size]:
        """Every tensor of the unquantized Hugging Face checkpoint this config describes, with its shape."""
        shapes = megatron_shapes(self.config, self.forward, self.head_dim)
        layers, experts = range(self.config.require("num_hidden_layers")), range(self.num_experts)
        out = {}
        for mapping in filter(lambda m: m.exported, self.mappings()):
            full = torch.empty(shapes[mapping.megatron], device="meta")
            ranges = (layers if mapping.layers is None else mapping.layers, experts)[: mapping.megatron.count("*")]
            for wildcards in itertools.product(*ranges):
                names = mapping.hf_names([str(w) for w in wildcards])
                out.update({name: tensor.shape for name, tensor in zip(names, mapping.to_hf(full))})
        return out

    def registry(self, quant_state: bool = False) -> MappingRegistry:
        return MappingRegistry(self.mappings(), quant_state=quant_state)

    def registry_for(self, model: torch.nn.Module) -> MappingRegistry:
        """The registry, with quantizer-state mappings exactly when the model carries quantizers."""
        return self.registry(quant_state=any(isinstance(m, TensorQuantizer) for m in model.modules()))


@functools.cache
def _latent_self_attention() -> type:
    """megatron's MLASelfAttention, whose query projection without a q LoRA stays the spec's plain linear: megatron
    0.19 (`QKNormConfigResolver`) swaps in a fused norm+linear whenever the latent norms are on, though no query
    latent is normalized there (Transformer Engine's, which the local spec lacks; 0.16 has no resolver)."""
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    class LatentSelfAttention(MLASelfAttention):
        def _resolve_qk_norm_config(self, submodules):
            resolved = super()._resolve_qk_norm_config(submodules)
            if self.config.q_lora_rank is None:
                resolved["linear_q_proj"] = submodules.linear_q_proj
            return resolved

    return LatentSelfAttention


@functools.cache
def _latent_dot_product_attention() -> type:
    """megatron's local attention for MLA, whose keys (qk_nope + qk_rope channels) are wider than its values:
    MLASelfAttention passes both widths (its base class builds one without them first), which only Transformer
    Engine's attention takes; the local one sizes its output by kv_channels (set to the value width) and reads
    key widths off the keys."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class LatentDotProductAttention(DotProductAttention):
        def __init__(self, *args, k_channels: int | None = None, v_channels: int | None = None, **kwargs):
            super().__init__(*args, **kwargs)

    return LatentDotProductAttention


@functools.cache
def _biased_row_parallel_linear() -> type:
    """linear_proj with a bias whatever `add_bias_linear` says: Llama / Qwen3 `attention_bias` puts biases on
    q/k/v and o_proj but not on the MLP, which megatron's one switch cannot express."""
    from megatron.core.tensor_parallel.layers import RowParallelLinear

    class BiasedRowParallelLinear(RowParallelLinear):
        def __init__(self, *args, bias: bool, **kwargs):
            super().__init__(*args, bias=True, **kwargs)

    return BiasedRowParallelLinear
