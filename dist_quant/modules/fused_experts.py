"""transformers' fused MoE experts, quantized per expert.

transformers 5 keeps an MoE layer's experts as two 3-D parameters (Qwen3-MoE, Mixtral, GLM-4-MoE and every model
that follows them): `gate_up_proj` [experts, 2 x intermediate, hidden] with each expert's gate rows first, and
`down_proj` [experts, hidden, intermediate]. Checkpoints, engines and our export name each expert's linears
(`experts.3.gate_proj`, Mixtral's `experts.3.w1`), and each has quantizers of its own. Here every expert gets one
quantizer slot per linear, a child module named as the checkpoint names it (`experts.3.gate_proj`), whose weight
is a view of its rows in the fused parameter: calibration, shared sibling scales, refits and QAT gradients all
reach the fused parameters through it. Which checkpoint names fold into which fused parameter is transformers'
own declaration (`transformers.conversion_mapping`), read, not restated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from dist_quant.modules.base import Layout, QuantModule, quantized_class
from dist_quant.modules.linear import LINEAR_QUANTIZERS
from dist_quant.formats import QuantFormat
from dist_quant.quantizer import TensorQuantizer

FUSED_GATE_UP, FUSED_DOWN = "gate_up_proj", "down_proj"
FUSED_PARAMETER = {"gate": FUSED_GATE_UP, "up": FUSED_GATE_UP, "down": FUSED_DOWN}  # where each part's rows are
_CHECKPOINT_EXPERT = re.compile(r"experts\.\*\.(\w+)\.weight$")


@dataclass(frozen=True)
class CheckpointNames:
    """How a transformers model's checkpoint names its tensors where memory holds them otherwise: per-expert
    linear names (gate, up, down: `gate_proj` / `up_proj` / `down_proj`, Mixtral's `w1` / `w3` / `w2`) and
    renamed blocks (Mixtral's checkpoint `block_sparse_moe` is `mlp` in memory)."""

    gate: str
    up: str
    down: str
    renamed: tuple[tuple[str, str], ...] = ()

    @property
    def parts(self) -> tuple[tuple[str, str], ...]:
        """(part, its checkpoint name) for gate, up and down."""
        return (("gate", self.gate), ("up", self.up), ("down", self.down))

    def in_memory(self, name: str) -> str:
        for checkpoint, memory in self.renamed:
            name = name.replace(checkpoint, memory)
        return name


def checkpoint_names(model: nn.Module) -> CheckpointNames | None:
    """The checkpoint names of a transformers model whose experts are fused, from transformers' conversion
    mapping for its model type; None for any other model (no fused experts: nothing to name)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        from transformers.conversion_mapping import WeightConverter, WeightRenaming, get_checkpoint_conversion_mapping
    except ImportError:  # transformers 4 keeps experts as separate linears
        return None
    if not isinstance(model_type, str):
        return None
    parts, renamed = {}, []
    for conversion in get_checkpoint_conversion_mapping(model_type) or ():
        targets = getattr(conversion, "target_patterns", ())
        if isinstance(conversion, WeightRenaming):
            renamed += [(s, t) for s, t in zip(conversion.source_patterns, targets) if _literal(s) and _literal(t)]
        elif isinstance(conversion, WeightConverter) and len(targets) == 1:
            fused = targets[0].rsplit(".", 1)[-1]
            names = [m.group(1) for m in map(_CHECKPOINT_EXPERT.search, conversion.source_patterns) if m]
            if fused in (FUSED_GATE_UP, FUSED_DOWN) and len(names) == len(conversion.source_patterns):
                parts[fused] = names  # concatenated in this order: gate rows first
    if len(parts.get(FUSED_GATE_UP, ())) != 2 or len(parts.get(FUSED_DOWN, ())) != 1:
        return None
    (gate, up), (down,) = parts[FUSED_GATE_UP], parts[FUSED_DOWN]
    return CheckpointNames(gate, up, down, tuple(renamed))


def _literal(pattern: str) -> bool:
    """A renaming applied as plain text: its pattern has no regular-expression syntax beyond dots."""
    return re.fullmatch(r"[\w.]+", pattern) is not None


def is_fused_experts(module: nn.Module) -> bool:
    """Experts laid out as described above, and nothing else (no biases, no other parameters)."""
    if set(module._parameters) != {FUSED_GATE_UP, FUSED_DOWN} or not hasattr(module, "act_fn"):
        return False
    gate_up, down = module._parameters[FUSED_GATE_UP], module._parameters[FUSED_DOWN]
    return gate_up.dim() == down.dim() == 3 and gate_up.shape[1] == 2 * down.shape[2] and gate_up.shape[0] == down.shape[0]


def expert_weight(experts: nn.Module, index: int, part: str) -> torch.Tensor:
    """Expert `index`'s weight of `part` ("gate", "up", "down") as a view of the fused parameter."""
    fused = experts._parameters[FUSED_PARAMETER[part]][index]
    if part == "down":
        return fused
    half = fused.shape[0] // 2
    return fused[:half] if part == "gate" else fused[half:]


class ExpertLinear(nn.Module, QuantModule):
    """One expert's linear inside fused parameters: its quantizers, and its weight as a view (the fused module
    is held outside the module tree, so that parameters and state_dict keys stay where transformers has them)."""

    def __init__(self, experts: nn.Module, index: int, part: str, formats: Mapping[str, QuantFormat | None], name: str):
        super().__init__()
        self.__dict__["_experts"] = experts
        self.index, self.part = index, part
        self.layout = Layout(name, expert=True)
        device = experts._parameters[FUSED_DOWN].device
        for quantizer in LINEAR_QUANTIZERS:
            self.add_module(quantizer, TensorQuantizer(formats.get(quantizer)).to(device))

    @property
    def weight(self) -> torch.Tensor:
        return expert_weight(self._experts, self.index, self.part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_quantizer(F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight)))

    def weight_quantizers(self) -> Iterator[tuple[TensorQuantizer, torch.Tensor]]:
        yield self.weight_quantizer, self.weight


class Expert(nn.Module):
    """An expert's three linears, under the checkpoint's names."""

    def __init__(self, linears: Mapping[str, ExpertLinear]):
        super().__init__()
        for name, linear in linears.items():
            self.add_module(name, linear)


class QuantFusedExperts:
    """transformers' experts forward (route, per expert: gate and up, activation, down, times the routing weight,
    summed into the token's output), through each expert's quantized linears."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        output = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hit = torch.unique(top_k_index).tolist()  # one host sync, as transformers' own loop has
        for index in hit:
            if not 0 <= index < len(self.quant_experts):  # transformers' padding index for dropped tokens
                continue
            token, slot = torch.where(top_k_index == index)
            gate, up, down = self.quant_experts[index]
            x = hidden_states[token]
            y = down(self.act_fn(gate(x)) * up(x)) * top_k_weights[token, slot, None]
            output.index_add_(0, token, y.to(output.dtype))
        return output


def convert_fused_experts(
    experts: nn.Module,
    names: CheckpointNames,
    formats_for: Callable[[str, torch.Tensor], Mapping[str, QuantFormat | None]],
    name: str,
) -> list[ExpertLinear]:
    """Give fused `experts` (named `name`) one quantized slot per expert and linear, children `E.<part name>`,
    configured by `formats_for(slot name, its weight)`. -> the slots."""
    count = experts._parameters[FUSED_DOWN].shape[0]
    slots = []
    for index in range(count):
        linears = {}
        for part, part_name in names.parts:
            slot = f"{name}.{index}.{part_name}"
            formats = formats_for(slot, expert_weight(experts, index, part))
            linears[part_name] = ExpertLinear(experts, index, part, formats, slot)
        experts.add_module(str(index), Expert(linears))
        slots.append(tuple(linears.values()))
    experts.__class__ = quantized_class(type(experts), QuantFusedExperts)
    experts.__dict__["quant_experts"] = slots  # (gate, up, down) by expert, for the forward
    return [linear for expert in slots for linear in expert]
