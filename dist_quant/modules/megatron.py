"""Quantized wrappers for megatron-core layers: tensor-parallel linears (dense and MoE experts) and the core
attention (K/V BMM quantizers). Each wrapper declares its layout, from which the sync rules are derived.

megatron-core is imported lazily, so the rest of dist_quant works without it.
"""

from __future__ import annotations

import functools
import re
import weakref
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from dist_quant.modules.base import Layout, QuantModule, quantized_class, structure_generation
from dist_quant.modules.linear import LINEAR_QUANTIZERS
from dist_quant.quantizer import (
    QuantFormat,
    QuantizerMode,
    SegmentAmax,
    TensorQuantizer,
    fake_quant_segments,
    segments_calibrate_together,
    segments_quantize_together,
    settings_generation,
)

_DISABLED = QuantizerMode.DISABLED

ATTENTION_QUANTIZERS = ("k_bmm_quantizer", "v_bmm_quantizer")
_LOCAL_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")
_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")


class QuantMegatronModule(QuantModule):
    def weight_quantizers(self) -> Iterator[tuple[TensorQuantizer, torch.Tensor]]:
        weight = self._parameters.get("weight")  # the dicts read directly: nn.Module's getattr costs ten times more
        if weight is not None:
            yield self._modules["weight_quantizer"], weight


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
    dropout in training keeps megatron's single call, whose random stream it follows); attention that holds no
    scores (`SdpaDotProductAttention`'s fused path) takes the batch at once."""

    def forward(self, query, key, value, attention_mask, *args, **kwargs):
        key, value = self.quantize_kv(key, value)
        batch = query.shape[1]  # megatron's layout: [s, b, heads, head dim]
        per_sequence = query.shape[2] * query.shape[0] * key.shape[0] * 4
        chunk = max(1, SCORES_BUDGET // per_sequence)
        mask_type = kwargs.get("attn_mask_type", args[0] if args else None)
        if (chunk >= batch or (self.training and self.attention_dropout.p > 0)
                or (isinstance(self, sdpa_attention()) and self.fused(query, key, attention_mask, mask_type))):
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


# Causal masks made by `causal_attention_mask`, by id: (a weak reference, its version when made). A mask is
# recognized while it is that object, unwritten since.
_CAUSAL_MASKS: dict[int, tuple[weakref.ref, int]] = {}


def causal_attention_mask(seq_len: int, device: torch.device | str) -> torch.Tensor:
    """megatron's boolean causal mask (True = masked), [1, 1, s, s], marked as causal: `SdpaDotProductAttention`
    computes attention under it without reading it. (megatron would build one on "cuda" for a mask of None.)"""
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(1)[None, None]
    key = id(mask)
    _CAUSAL_MASKS[key] = (weakref.ref(mask, lambda _: _CAUSAL_MASKS.pop(key, None)), mask._version)
    return mask


def is_marked_causal(mask: torch.Tensor) -> bool:
    """Whether `mask` is one `causal_attention_mask` made, never written since (a mask of one's own, however
    causal, is not: telling would take reading it on the device)."""
    entry = _CAUSAL_MASKS.get(id(mask))
    return entry is not None and entry[0]() is mask and entry[1] == mask._version


@functools.cache
def sdpa_attention() -> type:
    """`SdpaDotProductAttention` (megatron imported lazily)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    class SdpaDotProductAttention(DotProductAttention):
        """megatron's local core attention, computed by torch's `scaled_dot_product_attention` (flash attention on
        the GPU) where it is the same function: causal self-attention under no mask or a mask `causal_attention_mask`
        made, plain softmax (no learnable offset, no sliding window, no query-key layer scaling), no dropout
        active, no attention bias or packed sequences. Otherwise megatron's own forward. megatron's local attention
        computes and stores the scores of the whole batch, softmax and probabilities in separate kernels: a third
        of a 30B-shape forward's GPU time, and memory that grows with the square of the sequence
        (docs/mappings.md, "Core attention")."""

        def fused(self, query, key, attention_mask, attn_mask_type=None) -> bool:
            """Whether this forward takes the fused path."""
            config = self.config
            return (
                (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
                and (attention_mask is None or is_marked_causal(attention_mask))
                and query.shape[0] == key.shape[0]
                and self.softmax_offset is None
                and self.scale_mask_softmax.window_size is None
                and not config.apply_query_key_layer_scaling
                and not (self.training and self.attention_dropout.p > 0)
            )

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            if attention_bias is not None or packed_seq_params is not None or not self.fused(query, key, attention_mask, attn_mask_type):
                return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params)
            groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
            if groups > 1:  # query head h attends with key/value group h // groups, as megatron expands them
                key, value = key.repeat_interleave(groups, dim=2), value.repeat_interleave(groups, dim=2)
            # megatron's [s, b, heads, head dim] -> [b, heads, s, head dim] and back, as views
            query, key, value = (t.permute(1, 2, 0, 3) for t in (query, key, value))
            context = torch.nn.functional.scaled_dot_product_attention(
                query, key, value, is_causal=True, scale=self.softmax_scale)
            batch, _, sequence, _ = context.shape
            return context.permute(2, 0, 1, 3).reshape(sequence, batch, self.hidden_size_per_partition)

    return SdpaDotProductAttention


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
        return routing_weighted(output, per_token_scale), bias


def routing_weighted(x: torch.Tensor, per_token_scale: torch.Tensor) -> torch.Tensor:
    """x [tokens, n] times each token's routing weight, in x's dtype (megatron's rule wherever it applies it)."""
    return (x * per_token_scale.unsqueeze(-1)).to(x.dtype)


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


class GroupedExperts:
    """megatron's SequentialMLP computing all its local experts at once: linear_fc1 of every expert as one grouped
    GEMM (`torch.nn.functional.grouped_mm`), the activation once for the layer, linear_fc2 as one grouped GEMM,
    the routing weight where the expert MLPs apply it (megatron: into the activation; `RoutedExpertMLP`: after
    linear_fc2). The parameters, their names (`local_experts.{i}.linear_fc1.weight`), the experts interface and
    each expert's quantizers are SequentialMLP's, so loading, export, refit and quantizer state see no
    difference; the outputs, the calibrated amax and the fake-quantized values are those of SequentialMLP's
    forward, bit for bit on CPU (docs/mappings.md, "Grouped experts"). A role's quantizers (every expert's fc1
    input, fc1 weight, ..., fc2 output) do their work in one pass over the layer where their format allows
    (`_quantize_role`). A layer `_groups` refuses runs SequentialMLP's forward, expert by expert; `grouped`
    False: always (what benchmarks and tests compare against)."""

    grouped = True

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        hidden = permuted_local_hidden_states
        if not (self.grouped and self._groups(hidden)):
            return super().forward(hidden, tokens_per_expert, permuted_probs)
        roles = self._roles()
        counts = tokens_per_expert.tolist()  # megatron's dispatchers hand the counts over on the host
        # on the device once per layer, without waiting for it (a blocking copy would drain the GPU's queue)
        lengths = tokens_per_expert.to(hidden.device, non_blocking=True)
        offsets = torch.cumsum(lengths, 0, dtype=torch.int32)
        after_fc2 = isinstance(self.local_experts[0], RoutedExpertMLP)
        x = _quantize_role(roles.get("fc1.input_quantizer"), hidden, counts, lengths, offsets)
        x = _grouped_linear(x, _stacked_weights(roles["fc1"], roles.get("fc1.weight_quantizer")), counts, offsets)
        x = _quantize_role(roles.get("fc1.output_quantizer"), x, counts, lengths, offsets)
        x = self._activation(x, counts)
        if not after_fc2:
            x = routing_weighted(x, permuted_probs)
        x = _quantize_role(roles.get("fc2.input_quantizer"), x, counts, lengths, offsets)
        x = _grouped_linear(x, _stacked_weights(roles["fc2"], roles.get("fc2.weight_quantizer")), counts, offsets)
        x = _quantize_role(roles.get("fc2.output_quantizer"), x, counts, lengths, offsets)
        return (routing_weighted(x, permuted_probs) if after_fc2 else x), None

    def _groups(self, hidden: torch.Tensor) -> bool:
        """Whether this layer can run grouped; what it cannot do runs SequentialMLP's forward: inputs megatron
        changes before linear_fc1 (scaled by the routing weight, or padded for Transformer Engine's FP8/FP4),
        expert biases, activations megatron takes from Transformer Engine or fuses with a bias, weight gradients
        accumulated by megatron's fused kernel (`gradient_accumulation_fusion`, into `main_grad`), and expert
        linears other than megatron's own."""
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

        config = self.config
        if hidden.dim() != 2 or any(
            getattr(config, flag, False)
            for flag in ("moe_apply_probs_on_input", "fp8", "fp4", "use_te_activation_func", "bias_activation_fusion",
                         "gradient_accumulation_fusion")
        ):
            return False
        expert = self.local_experts[0]  # megatron builds every expert alike
        fc1, fc2 = expert.linear_fc1, expert.linear_fc2
        return (
            isinstance(fc1, ColumnParallelLinear) and isinstance(fc2, RowParallelLinear)
            and fc1.bias is None and fc2.bias is None
        )

    def _roles(self) -> dict:
        """The experts' linears ("fc1", "fc2": one list each) and their quantizers by role ("fc1.input_quantizer":
        an `_ExpertRole`; roles that no recipe enabled are left out), read again after any change of
        quantizers (`structure_generation`): listing them per forward would cost a millisecond of host time per
        layer at 128 experts."""
        cached = self.__dict__.get("_expert_roles")
        if cached is not None and cached[0] == structure_generation():
            return cached[1]
        roles = {}
        for which in ("fc1", "fc2"):
            linears = [getattr(expert, f"linear_{which}") for expert in self.local_experts]
            roles[which] = linears
            for name in LINEAR_QUANTIZERS:
                quantizers = [linear._modules.get(name) for linear in linears]
                if all(isinstance(q, TensorQuantizer) for q in quantizers) and any(q.enabled for q in quantizers):
                    roles[f"{which}.{name}"] = _ExpertRole(quantizers)
        self.__dict__["_expert_roles"] = (structure_generation(), roles)
        return roles

    def _activation(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """megatron's MLP activation (unfused, no bias: what `_groups` admits), for the layer at once on CUDA,
        where every element is computed by one function. On CPU expert by expert: torch's CPU kernels compute a
        loop's tail with the scalar function and the rest with vectorized approximations (exp, as in silu) that
        can differ in the last bit, and where a loop ends depends on the tensor's size and the thread split."""
        if x.is_cuda:
            return self._activate(x)
        return torch.cat([self._activate(segment) for segment in x.split(counts)])

    def _activate(self, x: torch.Tensor) -> torch.Tensor:
        config = self.config
        if not config.gated_linear_unit:
            return self.local_experts[0].activation_func(x)
        gate, linear = torch.chunk(x, 2, dim=-1)
        clamp = config.activation_func_clamp_value
        if clamp is not None:
            gate, linear = gate.clamp(min=None, max=clamp), linear.clamp(min=-clamp, max=clamp)
        return config.activation_func(gate) * (linear + config.glu_linear_offset)


class _ExpertRole:
    """One role's quantizers, one per expert (every expert's fc1 input quantizer, ...), and what a forward does
    with them (`plan`)."""

    def __init__(self, quantizers: list[TensorQuantizer]):
        self.quantizers = quantizers
        self.together = all(q.fmt == quantizers[0].fmt for q in quantizers)  # their work can be one pass
        self.amax = SegmentAmax(quantizers)
        self._plan: tuple[int, str] | None = None

    def plan(self) -> str:
        """"skip" (all disabled), "collect" (all calibrating together: `SegmentAmax`), "segments" (all
        fake-quantizing in one launch: `fake_quant_segments`) or "each" (quantizer by quantizer), decided again
        only after a quantizer's settings changed (asking 128 quantizers costs ~100 us per role and forward)."""
        generation = settings_generation()
        if self._plan is None or self._plan[0] != generation:
            quantizers = self.quantizers
            if all(q._mode is _DISABLED for q in quantizers):
                plan = "skip"
            elif self.together and segments_calibrate_together(quantizers):
                plan = "collect"
            elif self.together and segments_quantize_together(quantizers):
                plan = "segments"
            else:
                plan = "each"
            self._plan = (generation, plan)
        return self._plan[1]


def _quantize_role(
    role: _ExpertRole | None, x: torch.Tensor, counts: list[int], lengths: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """x [rows, n], each expert's rows (`counts`, in expert order; `lengths` the same on x's device, `offsets`
    their cumulative sums, int32) through that expert's quantizer of this role: calibrating, their amax
    collected in one pass (`SegmentAmax`); fake-quantizing (NVFP4), in one launch (`fake_quant_segments`), the
    straight-through gradient included; otherwise expert by expert."""
    plan = "skip" if role is None else role.plan()
    if plan == "skip":
        return x
    if plan == "collect":
        role.amax.collect(x, counts, lengths, offsets)
        return x
    if plan == "segments":
        return fake_quant_segments(role.quantizers, x, counts, offsets)
    segments = x.split(counts)
    outputs = [q(segment) for q, segment in zip(role.quantizers, segments)]
    if all(output is segment for output, segment in zip(outputs, segments)):  # calibrating: x as it came
        return x
    return torch.cat(outputs)


def _stacked_weights(linears: list[nn.Module], role: _ExpertRole | None) -> torch.Tensor:
    """The experts' weights [experts, out, in], through their weight quantizers (one launch where they can).
    `group_experts` lays each role's parameters out one after another in one tensor, so that outside autograd
    they are that tensor, read in place (`_stacked_in_memory`). Under autograd, or once something re-pointed a
    parameter (`module.to`, an optimizer's buffers), they are stacked: a copy of the layer's expert weights per
    forward, read and written once more at memory speed (bench_forward measures it), whose gradient reaches each
    expert's own parameter."""
    weights = [linear._parameters["weight"] for linear in linears]
    grad = torch.is_grad_enabled() and weights[0].requires_grad
    stacked = None if grad else _stacked_in_memory(linears[0], weights)
    if stacked is None:
        stacked = torch.stack(weights)
    plan = "skip" if role is None else role.plan()
    if plan == "skip":
        return stacked
    if plan == "segments":
        rows = [stacked.shape[1]] * len(weights)
        return fake_quant_segments(role.quantizers, stacked.flatten(0, 1), rows).view_as(stacked)
    return torch.stack([q(w) for q, w in zip(role.quantizers, stacked.unbind(0))])


def _stacked_in_memory(first: nn.Module, weights: list[torch.Tensor]) -> torch.Tensor | None:
    """The weights as one [experts, out, in] tensor without a copy, where they are still the consecutive slices
    of the tensor `_stack_in_place` made and left with the first expert's linear (their data pointers say so;
    that tensor, held, keeps its memory from reuse); else None, and a tensor they left is let go (it would
    hold a stale copy of the layer's weights)."""
    made = first.__dict__.get("_stacked_expert_weights")
    if made is None:
        return None
    if list(map(_DATA_PTR, weights)) != made[1]:
        del first.__dict__["_stacked_expert_weights"]
        return None
    return made[0]


_DATA_PTR = torch.Tensor.data_ptr


def _stack_in_place(linears: list[nn.Module]) -> None:
    """Each linear's weight data made a slice of one new [experts, out, in] tensor, in order (the same parameter
    objects and values; their old memory is freed): what `_stacked_in_memory` reads. Weights of differing
    shape, dtype or device are left as they are."""
    weights = [linear._parameters["weight"] for linear in linears]
    if _stacked_in_memory(linears[0], weights) is not None or len({(w.shape, w.dtype, w.device) for w in weights}) > 1:
        return
    stacked = torch.stack([w.detach() for w in weights])
    for weight, part in zip(weights, stacked.unbind(0)):
        weight.data = part
    linears[0].__dict__["_stacked_expert_weights"] = (stacked, list(map(_DATA_PTR, weights)))  # a plain attribute: no state


def _grouped_linear(x: torch.Tensor, weights: torch.Tensor, counts: list[int], offsets: torch.Tensor) -> torch.Tensor:
    """Each expert's rows of x times its weight transposed: one grouped GEMM where torch has it and the operands'
    strides are 16-byte multiples (as it demands), else expert by expert. On CPU torch's grouped GEMM computes
    each expert's product as the per-expert matmul does, bit for bit (tests/unit/test_grouped_experts.py), and
    so does megatron's linear (`torch.matmul(x, w.t())`); on CUDA it is a kernel of its own for bfloat16 (what
    real runs compute in), and other dtypes there run expert by expert."""
    alignment = 16 // x.element_size()
    kernel = _GROUPED_MM is not None and (x.dtype == torch.bfloat16 or not x.is_cuda)
    if kernel and len(x) and x.shape[1] % alignment == 0 and weights.shape[1] % alignment == 0:
        return _GROUPED_MM(x, weights.transpose(1, 2), offs=offsets)
    return torch.cat([torch.matmul(segment, weight.t()) for segment, weight in zip(x.split(counts), weights)])


_GROUPED_MM = getattr(torch.nn.functional, "grouped_mm", None)  # torch >= 2.10


def group_experts(model: nn.Module) -> int:
    """Make every megatron SequentialMLP of `model` a `GroupedExperts`, in place (parameters, names, state and
    quantizers unchanged; each role's expert weights moved into one stacked tensor they are slices of, see
    `_stacked_weights`): the models dist_quant builds are grouped already; a model of one's own opts in with
    this, after moving it to its device. Idempotent. -> number of MoE layers."""
    from megatron.core.transformer.moe.experts import SequentialMLP

    count = 0
    for module in model.modules():
        if isinstance(module, SequentialMLP):
            if not isinstance(module, GroupedExperts):
                module.__class__ = quantized_class(type(module), GroupedExperts, "Grouped")
            for which in ("linear_fc1", "linear_fc2"):
                _stack_in_place([getattr(expert, which) for expert in module.local_experts])
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
