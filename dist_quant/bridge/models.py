"""Model bridges: from a Hugging Face `config.json` to a megatron-core model (config, local layer spec) and the
table of mappings between their names. Llama-style dense, Qwen3 (q/k norms) and Qwen3-MoE."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dist_quant.bridge.mappings import (
    BridgeError,
    ColumnParallelMapping,
    GatedMLPMapping,
    Mapping,
    QKVMapping,
    RowParallelMapping,
)
from dist_quant.bridge.registry import MappingRegistry
from dist_quant.quantizer import TensorQuantizer

ARCHITECTURES = ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM")


@dataclass
class ModelBridge:
    """What one HF architecture needs: megatron config and spec, and the mapping table."""

    hf_config: dict

    @classmethod
    def from_hf(cls, config: dict | str | os.PathLike) -> "ModelBridge":
        """From a config dict, a `config.json`, or a checkpoint directory holding one."""
        if not isinstance(config, dict):
            path = Path(config)
            path = path / "config.json" if path.is_dir() else path
            if not path.is_file():
                raise BridgeError(f"{path}: no such config.json")
            config = json.loads(path.read_text())
        architectures = config.get("architectures") or []
        supported = [a for a in architectures if a in ARCHITECTURES]
        if not supported:
            raise BridgeError(f"architectures {architectures} not supported; supported: {', '.join(ARCHITECTURES)}")
        return cls(dict(config, architectures=supported))

    # -- what the config says ----------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        return self.hf_config["architectures"][0]

    @property
    def moe(self) -> bool:
        return self.architecture == "Qwen3MoeForCausalLM"

    @property
    def qk_norm(self) -> bool:
        return self.architecture.startswith("Qwen3")

    @property
    def tied(self) -> bool:
        return bool(self.hf_config.get("tie_word_embeddings", False))

    def _c(self, key: str, default=None):
        value = self.hf_config.get(key, default)
        if value is None:
            raise BridgeError(f"config.json lacks {key!r}")
        return value

    @property
    def head_dim(self) -> int:
        return self.hf_config.get("head_dim") or self._c("hidden_size") // self._c("num_attention_heads")

    @property
    def num_experts(self) -> int:
        if not self.moe:
            return 0
        if self.hf_config.get("mlp_only_layers") or self.hf_config.get("decoder_sparse_step", 1) != 1:
            raise BridgeError("MoE models with dense layers in between (mlp_only_layers, decoder_sparse_step) are not supported")
        return self.hf_config.get("num_experts") or self._c("num_local_experts")  # renamed in transformers 5

    # -- megatron side -----------------------------------------------------------------------------------
    def transformer_config(self, tp: int = 1, ep: int = 1, etp: int | None = None, dtype=torch.float32):
        from megatron.core.transformer import TransformerConfig

        heads, groups = self._c("num_attention_heads"), self.hf_config.get("num_key_value_heads") or self._c("num_attention_heads")
        if groups % tp:
            raise BridgeError(f"num_key_value_heads={groups} is not divisible by TP={tp}")
        if self.moe and self.num_experts % ep:
            raise BridgeError(f"num_experts={self.num_experts} is not divisible by EP={ep}")
        moe = (
            dict(
                num_moe_experts=self.num_experts,
                moe_router_topk=self._c("num_experts_per_tok"),
                moe_ffn_hidden_size=self._c("moe_intermediate_size"),
                moe_router_pre_softmax=not self.hf_config.get("norm_topk_prob", False),
                moe_token_dispatcher_type="allgather",
                moe_aux_loss_coeff=0.0,
                expert_model_parallel_size=ep,
                expert_tensor_parallel_size=tp if etp is None else etp,
            )
            if self.moe
            else {}
        )
        return TransformerConfig(
            num_layers=self._c("num_hidden_layers"),
            hidden_size=self._c("hidden_size"),
            ffn_hidden_size=self.hf_config.get("intermediate_size") or self._c("moe_intermediate_size"),
            num_attention_heads=heads,
            num_query_groups=groups,
            kv_channels=self.head_dim,
            gated_linear_unit=True,
            activation_func=torch.nn.functional.silu,
            add_bias_linear=False,
            add_qkv_bias=bool(self.hf_config.get("attention_bias", False)),
            normalization="RMSNorm",
            layernorm_epsilon=self._c("rms_norm_eps"),
            qk_layernorm=self.qk_norm,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            use_cpu_initialization=True,
            params_dtype=dtype,
            tensor_model_parallel_size=tp,
            **moe,
        )

    def build(self, tp: int = 1, ep: int = 1, etp: int | None = None, dtype=torch.float32):
        """A megatron-core GPTModel (local layer spec) for this rank. megatron's parallel state must be set."""
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        config = self.transformer_config(tp, ep, etp, dtype)
        spec = get_gpt_layer_local_spec(
            num_experts=config.num_moe_experts, moe_grouped_gemm=False, qk_layernorm=self.qk_norm, normalization="RMSNorm"
        )
        rope = self.hf_config.get("rope_theta") or (self.hf_config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return GPTModel(
            config,
            spec,
            vocab_size=self._c("vocab_size"),
            max_sequence_length=self._c("max_position_embeddings"),
            position_embedding_type="rope",
            rotary_base=rope,
            share_embeddings_and_output_weights=self.tied,
        )

    # -- names -------------------------------------------------------------------------------------------
    def mappings(self) -> list[Mapping]:
        layer, hf = "decoder.layers.*", "model.layers.*"
        table: list[Mapping] = [
            ColumnParallelMapping("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
            Mapping(f"{layer}.input_layernorm.weight", f"{hf}.input_layernorm.weight"),
            QKVMapping(
                f"{layer}.self_attention.linear_qkv.weight",
                tuple(f"{hf}.self_attn.{p}_proj.weight" for p in "qkv"),
                num_heads=self._c("num_attention_heads"),
                num_groups=self.hf_config.get("num_key_value_heads") or self._c("num_attention_heads"),
                head_dim=self.head_dim,
            ),
            RowParallelMapping(f"{layer}.self_attention.linear_proj.weight", f"{hf}.self_attn.o_proj.weight"),
            Mapping(f"{layer}.pre_mlp_layernorm.weight", f"{hf}.post_attention_layernorm.weight"),
            Mapping("decoder.final_layernorm.weight", "model.norm.weight"),
        ]
        if self.qk_norm:
            table += [
                Mapping(f"{layer}.self_attention.q_layernorm.weight", f"{hf}.self_attn.q_norm.weight"),
                Mapping(f"{layer}.self_attention.k_layernorm.weight", f"{hf}.self_attn.k_norm.weight"),
            ]
        if self.moe:
            experts, hf_experts = f"{layer}.mlp.experts.local_experts.*", f"{hf}.mlp.experts.*"
            table += [
                Mapping(f"{layer}.mlp.router.weight", f"{hf}.mlp.gate.weight"),
                GatedMLPMapping(
                    f"{experts}.linear_fc1.weight", (f"{hf_experts}.gate_proj.weight", f"{hf_experts}.up_proj.weight"), expert=True
                ),
                RowParallelMapping(f"{experts}.linear_fc2.weight", f"{hf_experts}.down_proj.weight", expert=True),
            ]
        else:
            table += [
                GatedMLPMapping(f"{layer}.mlp.linear_fc1.weight", (f"{hf}.mlp.gate_proj.weight", f"{hf}.mlp.up_proj.weight")),
                RowParallelMapping(f"{layer}.mlp.linear_fc2.weight", f"{hf}.mlp.down_proj.weight"),
            ]
        if not self.tied:
            table.append(ColumnParallelMapping("output_layer.weight", "lm_head.weight"))
        return table

    def registry(self, quant_state: bool = False) -> MappingRegistry:
        return MappingRegistry(self.mappings(), quant_state=quant_state)

    def registry_for(self, model: torch.nn.Module) -> MappingRegistry:
        """The registry, with quantizer-state mappings exactly when the model carries quantizers."""
        return self.registry(quant_state=any(isinstance(m, TensorQuantizer) for m in model.modules()))
