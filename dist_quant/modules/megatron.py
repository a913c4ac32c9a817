"""Quantized wrappers for megatron-core layers: tensor-parallel linears (dense and MoE experts) and the core
attention (K/V BMM quantizers). Each wrapper declares its layout, from which the sync rules are derived.

megatron-core is imported lazily, so the rest of dist_quant works without it.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from dist_quant.modules.base import Layout, QuantModule, quantized_class
from dist_quant.modules.linear import LINEAR_QUANTIZERS
from dist_quant.quantizer import (
    QuantFormat,
    QuantizerMode,
    SegmentAmax,
    TensorQuantizer,
    fake_quant_segments,
    segments_calibrate_together,
    segments_quantize_together,
    suspended,
)

_DISABLED = QuantizerMode.DISABLED

ATTENTION_QUANTIZERS = ("k_bmm_quantizer", "v_bmm_quantizer")
_LOCAL_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")
_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")


class QuantMegatronModule(QuantModule):
    def weight_quantizers(self) -> Iterator[tuple[TensorQuantizer, torch.Tensor]]:
        if "weight" in self._parameters:
            yield self.weight_quantizer, self.weight


class QuantParallelLinear(QuantMegatronModule):
    """ColumnParallelLinear / RowParallelLinear: input, weight and output quantizers. The weight is fake-quantized
    in place of the parameter for the duration of the forward, so megatron's own code path runs unchanged.
    `discard_output` (see `calibrate.logits_discarded`): the input is seen, the product is not computed and an
    empty output (last dimension 0) is returned."""

    discard_output = False

    def forward(self, input_: torch.Tensor, *args, **kwargs):
        # A disabled quantizer is the identity: skipped without a call (MoE layers run hundreds of these).
        if self.input_quantizer._mode is not _DISABLED:
            input_ = self.input_quantizer(input_)
        if self.discard_output:
            return input_.new_empty((*input_.shape[:-1], 0)), None
        explicit = kwargs.get("weight", args[0] if args else None)
        if self.weight_quantizer._mode is _DISABLED:
            output, bias = super().forward(input_, *args, **kwargs)
        elif explicit is not None:  # output layer sharing the embedding's weight
            kwargs["weight"] = self.weight_quantizer(explicit)
            output, bias = super().forward(input_, *args[1:], **kwargs)
        else:  # the parameter swapped in place (no context manager: this runs thousands of times per forward)
            weight = self._parameters["weight"]
            self._parameters["weight"] = self.weight_quantizer(weight)
            try:
                output, bias = super().forward(input_, *args, **kwargs)
            finally:
                self._parameters["weight"] = weight
        if self.output_quantizer._mode is not _DISABLED:
            output = self.output_quantizer(output)
        return output, bias


# Bytes of float32 attention scores one product of megatron's local attention may hold at once.
SCORES_BUDGET = 512 << 20


class QuantDotProductAttention(QuantMegatronModule):
    """Core attention with quantizers on K and V as they enter the attention products. megatron's local attention
    holds the scores of the whole batch, [batch x heads, s, s], several times over (in its dtype, in float32 for
    the softmax, the probabilities): 13 GB for 8 sequences of 2048 tokens and 32 heads. Batches whose float32
    scores exceed SCORES_BUDGET are computed a few sequences at a time (each sequence's attention is its own;
    dropout in training keeps megatron's single call, whose random stream it follows)."""

    def forward(self, query, key, value, attention_mask, *args, **kwargs):
        key, value = self.quantize_kv(key, value)
        batch = query.shape[1]  # megatron's layout: [s, b, heads, head dim]
        per_sequence = query.shape[2] * query.shape[0] * key.shape[0] * 4
        chunk = max(1, SCORES_BUDGET // per_sequence)
        if chunk >= batch or (self.training and self.attention_dropout.p > 0):
            return super().forward(query, key, value, attention_mask, *args, **kwargs)
        outputs = []
        for start in range(0, batch, chunk):
            rows = slice(start, start + chunk)
            mask = attention_mask if attention_mask is None or attention_mask.shape[0] == 1 else attention_mask[rows]
            outputs.append(super().forward(query[:, rows], key[:, rows], value[:, rows], mask, *args, **kwargs))
        return torch.cat(outputs, dim=1)

    def quantize_kv(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V as the serving engine caches them: each quantized by its own quantizer."""
        return self.k_bmm_quantizer(key), self.v_bmm_quantizer(value)

    def weight_quantizers(self):
        return iter(())


class LatentCacheAttention:
    """The core attention of multi-latent attention (DeepSeek), whose KV cache in vLLM and SGLang is one row per
    token, [kv_a_layernorm(latent) | roped shared key part], quantized with one scale (vLLM's k_scale; v_scale
    only stands in for it): keys and values are computed from that row. So the K/V BMM quantizers act on the row,
    not on the per-head keys and values: on the latent as kv_layernorm puts it out (`LatentCacheNorm`) and here on
    the keys' rope channels (the shared part, repeated per head), K's then V's quantizer, one format for both, so
    both calibrate the same amax and quantizing twice changes nothing. The per-head keys' other channels and the
    values pass as they come, computed from the quantized latent."""

    def quantize_kv(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rope = self.config.qk_pos_emb_head_dim
        cached = self.v_bmm_quantizer(self.k_bmm_quantizer(key[..., -rope:]))
        return torch.cat([key[..., :-rope], cached], dim=-1), value


class LatentCacheNorm:
    """MLA's kv_layernorm, whose output (the cached latent) goes through the attention's K/V BMM quantizers
    (held as plain references: they are the core attention's)."""

    def forward(self, x):
        k, v = self.__dict__["cache_quantizers"]
        return v(k(super().forward(x)))


def quantize_latent_caches(model: nn.Module) -> int:
    """Give every multi-latent attention whose core attention carries K/V BMM quantizers the cache quantization
    of `LatentCacheAttention`. Idempotent. -> number of such attention layers. ValueError (one line) where the
    two quantizers' formats differ: the row has one scale."""
    from megatron.core.transformer.multi_latent_attention import MultiLatentAttention

    count = 0
    for name, module in model.named_modules():
        core = getattr(module, "core_attention", None)
        if not isinstance(module, MultiLatentAttention) or not isinstance(core, QuantDotProductAttention):
            continue
        k, v = core.k_bmm_quantizer, core.v_bmm_quantizer
        if k.fmt != v.fmt:
            raise ValueError(
                f"{name}.core_attention: multi-latent attention caches one latent row per token with one scale; "
                f"k_bmm_quantizer ({k.fmt.describe() if k.fmt else 'disabled'}) and v_bmm_quantizer "
                f"({v.fmt.describe() if v.fmt else 'disabled'}) need one format"
            )
        if not isinstance(core, LatentCacheAttention):
            core.__class__ = quantized_class(type(core), LatentCacheAttention)
        norm = module.kv_layernorm
        if not isinstance(norm, LatentCacheNorm):
            norm.__class__ = quantized_class(type(norm), LatentCacheNorm)
        norm.__dict__["cache_quantizers"] = (k, v)
        count += 1
    return count


class RoutedExpertMLP:
    """An expert MLP that multiplies its routing weight into the output of linear_fc2, as transformers, vLLM,
    SGLang and TensorRT-LLM do, instead of into its input, as megatron-core does. The fc2 input quantizer then
    sees the activation the serving engine quantizes; without quantization both orders give the same output."""

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        output, bias = super().forward(hidden_states, None, **kwargs)
        if per_token_scale is None:
            return output, bias
        if bias is not None:  # megatron too adds a routed expert's bias before the weighting
            output, bias = output + bias, None
        return (output * per_token_scale.unsqueeze(-1)).to(output.dtype), bias


def route_after_fc2(model: nn.Module) -> int:
    """Give every routed expert MLP (megatron `MLP` whose linears are expert linears) the routing weight after
    linear_fc2. Idempotent. -> number of expert MLPs."""
    from megatron.core.transformer.mlp import MLP

    count = 0
    for module in model.modules():
        if isinstance(module, MLP) and getattr(module.linear_fc1, "is_expert", False):
            if not isinstance(module, RoutedExpertMLP):
                module.__class__ = quantized_class(type(module), RoutedExpertMLP)
            count += 1
    return count


class BatchedExperts:
    """megatron's SequentialMLP, whose experts' quantizers do their per-expert work in one pass per layer where
    they can, instead of once per expert (hundreds of small launches per forward otherwise bound an MoE forward by
    host time):
    - calibrating, the linear_fc1 input quantizers collect their amax in one pass over the layer's tokens
      (megatron lays them out one expert after another; `SegmentAmax`);
    - quantizing outside autograd, the linear_fc1 inputs are fake-quantized in one launch, and so are the
      stacked linear_fc1 weights and the stacked linear_fc2 weights (`fake_quant_segments`);
    then the experts run with those quantizers suspended and the fake-quantized weights swapped in. The values are
    those of the per-expert quantizers, bit for bit; other modes and formats run per expert (see
    `segments_calibrate_together`, `segments_quantize_together`). `batched` False: always per expert."""

    batched = True

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        hidden = permuted_local_hidden_states
        if not (self.batched and self.num_local_experts > 1 and hidden.dim() == 2 and not self._reshapes_inputs()):
            return super().forward(hidden, tokens_per_expert, permuted_probs)
        input_quantizers = self.__dict__["fc1_input_quantizers"]
        suspend, swaps = [], []
        if segments_calibrate_together(input_quantizers):
            self.__dict__["fc1_input_amax"].collect(hidden, tokens_per_expert.tolist())
            suspend += input_quantizers
        elif segments_quantize_together(input_quantizers):
            hidden = fake_quant_segments(input_quantizers, hidden, tokens_per_expert.tolist())
            suspend += input_quantizers
        for linears in self.__dict__["expert_linears"]:
            quantizers = [linear.weight_quantizer for linear in linears]
            if segments_quantize_together(quantizers):
                weights = torch.stack([linear.weight for linear in linears])
                rows = [weights.shape[1]] * len(linears)
                quantized = fake_quant_segments(quantizers, weights.flatten(0, 1), rows).view_as(weights)
                swaps += zip(linears, quantized.unbind(0))
                suspend += quantizers
        if not suspend:
            return super().forward(hidden, tokens_per_expert, permuted_probs)
        with suspended(suspend), _swapped_weights(swaps):
            return super().forward(hidden, tokens_per_expert, permuted_probs)

    def _reshapes_inputs(self) -> bool:
        """megatron changes the experts' inputs before linear_fc1: scaled by the routing weight, or padded."""
        config = self.config
        return bool(config.moe_apply_probs_on_input or config.fp8 or config.fp4)


@contextmanager
def _swapped_weights(swaps):
    """Each linear's weight parameter replaced by the given tensor for the duration."""
    originals = [(linear, linear._parameters["weight"]) for linear, _ in swaps]
    for linear, weight in swaps:
        linear._parameters["weight"] = weight
    try:
        yield
    finally:
        for linear, weight in originals:
            linear._parameters["weight"] = weight


def batch_experts(model: nn.Module) -> int:
    """Make every SequentialMLP whose experts' quantizers share one format per role a BatchedExperts (after the
    experts were converted). Idempotent. -> number of such layers."""
    from megatron.core.transformer.moe.experts import SequentialMLP

    count = 0
    for module in model.modules():
        if not isinstance(module, SequentialMLP) or not len(module.local_experts):
            continue
        experts = module.local_experts
        if not all(isinstance(e.linear_fc1, QuantModule) and isinstance(e.linear_fc2, QuantModule) for e in experts):
            continue
        linears = [[e.linear_fc1 for e in experts], [e.linear_fc2 for e in experts]]
        roles = [[e.linear_fc1.input_quantizer for e in experts]] + [[lin.weight_quantizer for lin in ls] for ls in linears]
        if any(q.fmt != role[0].fmt for role in roles for q in role):
            continue
        if any(len({tuple(lin.weight.shape) for lin in ls}) > 1 for ls in linears):
            continue
        if not isinstance(module, BatchedExperts):
            module.__class__ = quantized_class(type(module), BatchedExperts)
        # plain attributes: no submodules, no state
        module.__dict__["fc1_input_quantizers"] = roles[0]
        module.__dict__["fc1_input_amax"] = SegmentAmax(roles[0])
        module.__dict__["expert_linears"] = linears
        count += 1
    return count


def experts_per_rank(model: nn.Module) -> int:
    """Local experts of each MoE layer on this rank (0 without MoE)."""
    counts = {len(m) for n, m in model.named_modules() if n.endswith("local_experts")}
    if len(counts) > 1:
        raise ValueError(f"MoE layers with different numbers of local experts: {sorted(counts)}")
    return counts.pop() if counts else 0


def logical_namer(model: nn.Module, ep_rank: int) -> Callable[[str], str]:
    """Local module / parameter name -> its name in the unsharded model: global layer number (pipeline offset,
    from `layer_number`) and global expert number (EP rank x local experts + local index)."""
    layers = {}
    for name, module in model.named_modules():
        match = _LAYER.search(name + ".")
        if match and match.end() == len(name) + 1 and hasattr(module, "layer_number"):
            layers[name + "."] = name[: match.start(2)] + f"{module.layer_number - 1}."
    first_expert = ep_rank * experts_per_rank(model)

    def logical(name: str) -> str:
        for local, global_ in layers.items():
            if name.startswith(local):
                name = global_ + name[len(local):]
                break
        return _LOCAL_EXPERT.sub(lambda m: f".local_experts.{first_expert + int(m.group(1))}.", name)

    return logical


def _linear_layout(module: nn.Module, logical: str) -> Layout:
    weight = module.weight
    expert = bool(getattr(module, "is_expert", False))
    sharded = bool(getattr(weight, "tensor_model_parallel", False))
    return Layout(
        logical_name=logical,
        shard_dim=getattr(weight, "partition_dim", None) if sharded else None,
        shard_group="etp" if expert else "tp",
        stride=getattr(weight, "partition_stride", 1),
        expert=expert,
    )


def megatron_layer_kinds() -> dict[type, tuple[type, tuple[str, ...]]]:
    """megatron class -> (wrapper mixin, quantizer names)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    return {
        ColumnParallelLinear: (QuantParallelLinear, LINEAR_QUANTIZERS),
        RowParallelLinear: (QuantParallelLinear, LINEAR_QUANTIZERS),
        DotProductAttention: (QuantDotProductAttention, ATTENTION_QUANTIZERS),
    }


def convert_megatron_module(
    module: nn.Module, mixin: type, formats: Mapping[str, QuantFormat | None], layout: Layout, device: torch.device
) -> nn.Module:
    module.__class__ = quantized_class(type(module), mixin)
    module.layout = layout
    for name, fmt in formats.items():
        module.add_module(name, TensorQuantizer(fmt).to(device))
    return module


def layout_for(module: nn.Module, logical: str) -> Layout:
    return _linear_layout(module, logical) if "weight" in module._parameters else Layout(logical)
