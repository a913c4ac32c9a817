"""The shared-state stage: sibling quantizers of a format with a per-tensor scale over its block scales (NVFP4:
`NumberFormat.global_scale`) get one global amax, the max over the group, reduced over expert-parallel ranks when
a group spans experts, so every rank ends with the same value."""

from __future__ import annotations

import os
import re
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from dist_quant.modules.base import quant_modules, structure_version
from dist_quant.modules.shared import SharedQuantState
from dist_quant.parallel.groups import ParallelGroups, group_ranks
from dist_quant.parallel.reduce import AmaxReducer
from dist_quant.quantizer import TensorQuantizer
from dist_quant.recipe import Algorithm

ROLES = ("weight", "input")


def _state_attr(role: str) -> str:
    return f"shared_{role}_state"


def group_key(name: str, patterns: tuple[str, ...]) -> str | None:
    """The group of a quantizer: the capture groups of the first pattern that fully matches its name, joined by
    "." (the whole pattern when it captures nothing), and that pattern's place in the list (two patterns never
    form one group: q_proj and kv_a_proj_with_mqa share a parent, not a layer); None when no pattern matches."""
    for index, pattern in enumerate(patterns):
        match = re.fullmatch(pattern, name)
        if match:
            return f"{'.'.join(match.groups())} [{index}]" if match.re.groups else pattern
    return None


def _nvfp4_members(model: nn.Module, algorithm: Algorithm) -> Iterator[tuple[tuple[str, str], str, TensorQuantizer]]:
    for name, module in quant_modules(model):
        for role in ROLES:
            q = getattr(module, f"{role}_quantizer", None)
            if isinstance(q, TensorQuantizer) and q.enabled and q.fmt.number.global_scale:
                key = group_key(f"{module.layout.logical_name}.{role}_quantizer", algorithm.sibling_patterns(role))
                if key is not None:
                    yield (role, key), name, q


def _drop_earlier_states(model: nn.Module) -> None:
    """States from an earlier calibration or another model are not trusted: members recompute from scratch."""
    for module in list(model.modules()):  # states hang off any parent: every module is looked at
        for attr in [attr for attr, child in module._modules.items() if isinstance(child, SharedQuantState)]:
            delattr(module, attr)
        if isinstance(module, TensorQuantizer):  # dicts written directly: nn.Module's setattr costs more, per quantizer
            module._buffers["_global_amax"] = None
            module.__dict__["shared_state"] = None


class _Sharing:
    """Which quantizers share a global amax, worked out once per change of the model's quantizers, recipe
    patterns and expert-parallel group (the membership is structural; a recalibration after a training step only
    needs new values, and walking a 30B MoE's modules and matching its quantizer names costs more than that)."""

    def __init__(self, model: nn.Module, algorithm: Algorithm, groups: ParallelGroups, key: tuple):
        self.key = key
        _drop_earlier_states(model)
        members: dict[tuple[str, str], list[tuple[str, TensorQuantizer]]] = {}
        for group, name, q in _nvfp4_members(model, algorithm):
            members.setdefault(group, []).append((name, q))
        counts = {group: len(m) for group, m in members.items()}
        ep_group = groups.domains["ep"]
        if ep_group is not None:  # experts of one group may sit on other EP ranks
            everyone = [None] * dist.get_world_size(ep_group)
            dist.all_gather_object(everyone, counts, group=ep_group)
            counts = {}
            for rank_counts in everyone:
                for group, n in rank_counts.items():
                    counts[group] = counts.get(group, 0) + n
        self.shared = sorted(group for group, n in counts.items() if n > 1)  # singletons stay alone
        self.members = {group: members.get(group, []) for group in self.shared}
        device = next((q._amax.device for m in members.values() for _, q in m), torch.device("cpu"))
        self.reducer = AmaxReducer(groups, device)
        for group in self.shared:
            self.reducer.register("ep", "|".join(group), torch.Size([]), lambda view: None)
        self.reducer.allocate()
        self.states = {}
        for group in self.shared:
            if self.members[group]:
                names = [name for name, _ in self.members[group]]
                self.states[group] = SharedQuantState(group[1], names, torch.zeros((), device=device))
                _attach(model, names, group[0], self.states[group])

    def update(self) -> None:
        """Each group's value, the max of its members' amax over the expert-parallel ranks, into its state and
        every member's `_global_amax`: a few multi-tensor launches and one all-reduce, whatever the groups."""
        if not self.shared:
            return
        arena = self.reducer.arenas["ep"]
        local = [(arena.offsets["|".join(g)], [q._amax for _, q in self.members[g]]) for g in self.shared if self.members[g]]
        if local:
            maxima = torch.stack([torch.stack(amax).max() for _, amax in local])
            arena.flat.zero_().index_copy_(0, torch.tensor([o for o, _ in local], device=arena.flat.device), maxima)
        self.reducer.sync(check_finite=False)
        targets, values = [], []
        for group, state in self.states.items():
            value = arena.flat[arena.offsets["|".join(group)]]
            targets.append(state.global_amax)
            values.append(value)
            for _, q in self.members[group]:
                if q._global_amax is None or q._global_amax.dim() != 0:
                    q._global_amax = torch.zeros((), device=value.device)
                targets.append(q._global_amax)
                values.append(value)
                q.__dict__["shared_state"] = state  # a reference, not a submodule
        torch._foreach_copy_(targets, values)


def form_shared_states(model: nn.Module, algorithm: Algorithm, groups: ParallelGroups) -> int:
    """Give every group of siblings one global amax (collective over EP ranks). -> number of groups formed."""
    key = (
        structure_version(model),
        tuple(algorithm.sibling_patterns(role) for role in ROLES),
        group_ranks(groups.domains["ep"]),
    )
    sharing = model.__dict__.get("_dist_quant_sharing")
    if sharing is None or sharing.key != key:
        sharing = model.__dict__["_dist_quant_sharing"] = _Sharing(model, algorithm, groups, key)
    sharing.update()
    return len(sharing.shared)


def _attach(model: nn.Module, names: list[str], role: str, state: SharedQuantState) -> None:
    """Hang the state off the members' closest common parent that is not a container (a state inside a
    ModuleList would become one of its items), under the first free `shared_<role>_state[_N]`."""
    path = os.path.commonprefix([n.split(".") for n in names])
    path = path[:-1] if len(names) == 1 else path
    parent = model.get_submodule(".".join(path))
    while path and isinstance(parent, (nn.ModuleList, nn.ModuleDict, nn.Sequential)):
        path = path[:-1]
        parent = model.get_submodule(".".join(path))
    attr, n = _state_attr(role), 0
    while hasattr(parent, attr):
        n += 1
        attr = f"{_state_attr(role)}_{n}"
    parent.add_module(attr, state)
