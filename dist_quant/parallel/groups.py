"""Process groups, and the reduction domains built from them.

A reduction domain is the set of ranks whose copies of one amax must agree: e.g. an activation amax of a dense
layer is reduced over data-parallel ranks (different data) and tensor-parallel ranks (different pieces) at once.
Each domain is one process group, so a sync costs one collective per domain, whatever the number of quantizers.
"""

from __future__ import annotations

import datetime
import sys
from dataclasses import dataclass, field

import torch.distributed as dist

# Domains by name: the groups whose ranks they join.
DOMAINS = {
    "tp": ("tp",),
    "dp+tp": ("dp", "tp"),
    "etp": ("etp",),
    "edp+etp": ("edp", "etp"),
    "ep": ("ep",),
}
GROUP_NAMES = ("tp", "dp", "ep", "etp", "edp")


def group_ranks(group: dist.ProcessGroup | None) -> tuple[int, ...]:
    """Global ranks of a group; None stands for this rank alone."""
    if group is None:
        return (dist.get_rank() if dist.is_initialized() else 0,)
    return tuple(dist.get_process_group_ranks(group))


def _join(partitions: list[list[tuple[int, ...]]]) -> list[tuple[int, ...]]:
    """Connected components of ranks linked by any of the given partitions (each a list of rank tuples)."""
    parent: dict[int, int] = {}

    def find(r: int) -> int:
        while parent.setdefault(r, r) != r:
            r = parent[r]
        return r

    for partition in partitions:
        for ranks in partition:
            for r in ranks:
                parent[find(r)] = find(ranks[0])
    components: dict[int, list[int]] = {}
    for r in parent:
        components.setdefault(find(r), []).append(r)
    return sorted(tuple(sorted(c)) for c in components.values())


@dataclass
class ParallelGroups:
    """Tensor-, data-, expert-, expert-tensor- and expert-data-parallel groups of this rank (None = size 1),
    and the reduction domains joined from them."""

    tp: dist.ProcessGroup | None = None
    dp: dist.ProcessGroup | None = None
    ep: dist.ProcessGroup | None = None
    etp: dist.ProcessGroup | None = None
    edp: dist.ProcessGroup | None = None
    domains: dict[str, dist.ProcessGroup | None] = field(default_factory=dict)
    # for the domain groups made here; None: torch's default (30 minutes on gloo)
    timeout: datetime.timedelta | None = None
    # a model this rank holds alone (a plain torch model, e.g. a transformers model on one rank of a job): nothing
    # is reduced and no collective is issued, not even the world-wide agreements on errors
    alone: bool = False

    def __post_init__(self):
        if not self.domains:
            self.domains = self._build_domains()

    @classmethod
    def from_megatron(cls, timeout: datetime.timedelta | None = None) -> "ParallelGroups":
        """The groups `megatron.core.parallel_state.initialize_model_parallel` made. Collective: every rank calls.
        `timeout`: of the collectives on the reduction domains' groups."""
        from megatron.core import parallel_state as ps

        def sized(group):
            return group if group is not None and dist.get_world_size(group) > 1 else None

        return cls(
            tp=sized(ps.get_tensor_model_parallel_group()),
            dp=sized(ps.get_data_parallel_group()),
            ep=sized(ps.get_expert_model_parallel_group()),
            etp=sized(ps.get_expert_tensor_parallel_group()),
            edp=sized(ps.get_expert_data_parallel_group()),
            timeout=timeout,
        )

    def size(self, name: str) -> int:
        return len(group_ranks(getattr(self, name)))

    def rank(self, name: str) -> int:
        return group_ranks(getattr(self, name)).index(dist.get_rank() if dist.is_initialized() else 0)

    def _build_domains(self) -> dict[str, dist.ProcessGroup | None]:
        """Collective when distributed: every rank builds every domain's groups in the same order."""
        if not dist.is_initialized() or all(getattr(self, n) is None for n in GROUP_NAMES):
            return {name: None for name in DOMAINS}
        world = dist.get_world_size()
        memberships: list[dict[str, tuple[int, ...]]] = [None] * world  # type: ignore[list-item]
        mine = {name: group_ranks(getattr(self, name)) for name in GROUP_NAMES}
        dist.all_gather_object(memberships, mine)
        domains = {}
        for name, parts in DOMAINS.items():
            components = _join([[m[p] for m in memberships] for p in parts])
            if all(len(c) == 1 for c in components):
                domains[name] = None
                continue
            mine_group, _ = dist.new_subgroups_by_enumeration([list(c) for c in components], timeout=self.timeout)
            domains[name] = mine_group if dist.get_world_size(mine_group) > 1 else None
        return domains

    def describe(self) -> str:
        return " ".join(f"{n}={self.size(n)}" for n in GROUP_NAMES)


def megatron_loaded() -> bool:
    """A megatron model exists only if its user imported megatron: never pay for importing it here."""
    return "megatron.core.parallel_state" in sys.modules


def default_groups() -> ParallelGroups:
    """megatron's groups when its parallel state is initialized; else this process alone."""
    if megatron_loaded() and sys.modules["megatron.core.parallel_state"].model_parallel_is_initialized():
        return ParallelGroups.from_megatron()
    return ParallelGroups()
