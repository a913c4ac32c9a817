"""Quantized wrappers for megatron-core layers: tensor-parallel linears (dense and MoE experts) and the core
attention (K/V BMM quantizers). Each wrapper declares its layout, from which the sync rules are derived.

megatron-core is imported lazily, so the rest of dist_quant works without it.
"""

from __future__ import annotations

import re
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
    segments_calibrate_together,
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
    in place of the parameter for the duration of the forward, so megatron's own code path runs unchanged."""

    def forward(self, input_: torch.Tensor, *args, **kwargs):
        # A disabled quantizer is the identity: skipped without a call (MoE layers run hundreds of these).
        if self.input_quantizer._mode is not _DISABLED:
            input_ = self.input_quantizer(input_)
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


class QuantDotProductAttention(QuantMegatronModule):
    """Core attention with quantizers on K and V as they enter the attention products."""

    def forward(self, query, key, value, *args, **kwargs):
        return super().forward(query, self.k_bmm_quantizer(key), self.v_bmm_quantizer(value), *args, **kwargs)

    def weight_quantizers(self):
        return iter(())


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


class BatchedExpertInputs:
    """megatron's SequentialMLP, whose experts' linear_fc1 input quantizers collect their amax in one pass over
    the layer's tokens (megatron lays them out one expert after another) instead of once per expert, then run
    the experts with those quantizers suspended. The amax are those of the per-expert quantizers; other modes
    and formats (see `segments_calibrate_together`) run per expert. `batched` False: always per expert."""

    batched = True

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        hidden, quantizers = permuted_local_hidden_states, self.__dict__["fc1_input_quantizers"]
        if not (
            self.batched and self.num_local_experts > 1 and hidden.dim() == 2 and not self._reshapes_inputs()
            and segments_calibrate_together(quantizers)
        ):
            return super().forward(hidden, tokens_per_expert, permuted_probs)
        self.__dict__["fc1_input_amax"].collect(hidden, tokens_per_expert.tolist())
        with suspended(quantizers):
            return super().forward(hidden, tokens_per_expert, permuted_probs)

    def _reshapes_inputs(self) -> bool:
        """megatron changes the experts' inputs before linear_fc1: scaled by the routing weight, or padded."""
        config = self.config
        return bool(config.moe_apply_probs_on_input or config.fp8 or config.fp4)


def batch_expert_inputs(model: nn.Module) -> int:
    """Make every SequentialMLP whose experts' fc1 input quantizers share one format a BatchedExpertInputs
    (after the experts were converted). Idempotent. -> number of such layers."""
    from megatron.core.transformer.moe.experts import SequentialMLP

    count = 0
    for module in model.modules():
        if isinstance(module, SequentialMLP) and all(isinstance(e.linear_fc1, QuantModule) for e in module.local_experts):
            quantizers = [expert.linear_fc1.input_quantizer for expert in module.local_experts]
            if not quantizers or any(q.fmt != quantizers[0].fmt for q in quantizers):
                continue
            if not isinstance(module, BatchedExpertInputs):
                module.__class__ = quantized_class(type(module), BatchedExpertInputs)
            module.__dict__["fc1_input_quantizers"] = quantizers  # plain attributes: no submodules, no state
            module.__dict__["fc1_input_amax"] = SegmentAmax(quantizers)
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
