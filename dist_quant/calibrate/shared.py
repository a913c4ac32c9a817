"""The shared-state stage: sibling NVFP4 quantizers get one global amax, the max over the group, reduced over
expert-parallel ranks when a group spans experts, so every rank ends with the same value."""

from __future__ import annotations

import os
import re
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from dist_quant.modules import QuantModule
from dist_quant.modules.shared import SharedQuantState
from dist_quant.parallel.groups import ParallelGroups
from dist_quant.parallel.reduce import AmaxReducer
from dist_quant.quantizer import NVFP4, TensorQuantizer
from dist_quant.recipe import Algorithm

ROLES = ("weight", "input")


def _state_attr(role: str) -> str:
    return f"shared_{role}_state"


def group_key(name: str, patterns: tuple[str, ...]) -> str | None:
    """The group of a quantizer: the first capture group of the first pattern that fully matches its name (the
    whole pattern when it captures nothing); None when no pattern matches."""
    for pattern in patterns:
        match = re.fullmatch(pattern, name)
        if match:
            return match.group(1) if match.re.groups else pattern
    return None


def _nvfp4_members(model: nn.Module, algorithm: Algorithm) -> Iterator[tuple[tuple[str, str], str, TensorQuantizer]]:
    for name, module in model.named_modules():
        if not isinstance(module, QuantModule):
            continue
        for role in ROLES:
            q = getattr(module, f"{role}_quantizer", None)
            if isinstance(q, TensorQuantizer) and q.enabled and q.fmt.kind == NVFP4:
                key = group_key(f"{module.layout.logical_name}.{role}_quantizer", algorithm.sibling_patterns(role))
                if key is not None:
                    yield (role, key), name, q


def _drop_earlier_states(model: nn.Module) -> None:
    """States from an earlier calibration or another model are not trusted: members recompute from scratch."""
    for module in list(model.modules()):
        for attr, child in list(module.named_children()):
            if isinstance(child, SharedQuantState):
                delattr(module, attr)
        if isinstance(module, TensorQuantizer):
            module._global_amax = None
            module.__dict__["shared_state"] = None


def form_shared_states(model: nn.Module, algorithm: Algorithm, groups: ParallelGroups) -> int:
    """Give every group of siblings one global amax (collective over EP ranks). -> number of groups formed."""
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
    shared = sorted(group for group, n in counts.items() if n > 1)  # singletons stay alone
    if not shared:
        return 0
    device = next(q._amax.device for m in members.values() for _, q in m) if members else torch.device("cpu")
    reducer = AmaxReducer(groups, device)
    for group in shared:
        local = [q._amax for _, q in members.get(group, [])]
        reducer.register("ep", "|".join(group), torch.Size([]), lambda view, a=local: view.copy_(torch.stack(a).max()) if a else None)
    reducer.allocate()
    reducer.sync(check_finite=False)
    values = reducer.values(reducer.arenas["ep"])
    for group in shared:
        if group not in members:
            continue
        role, key = group
        names = [name for name, _ in members[group]]
        state = SharedQuantState(key, names, values["|".join(group)].clone())
        _attach(model, names, role, state)
        for _, q in members[group]:
            q._global_amax = state.global_amax.clone()
            q.__dict__["shared_state"] = state  # a reference, not a submodule
    return len(shared)


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
