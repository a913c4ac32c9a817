"""Logical-key MAX reduction of amax values.

Every amax that must agree across ranks is registered under its logical key (its name in the unsharded model)
in one reduction domain. Registration makes the amax a view into one flat buffer per domain, laid out in
logical-key order, which is the same on every rank of the domain. A sync is then one MAX all-reduce per domain:
nothing to gather or scatter, O(1) collectives whatever the number of quantizers, and a result independent of
the TP/EP layout. Ranks that saw no data contribute 0 (amax are >= 0), so a sync never waits on missing values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from dist_quant.parallel.agree import first_error
from dist_quant.parallel.groups import ParallelGroups


LOCAL = "local"


class NonFiniteAmaxError(ValueError):
    """Calibration data held NaN or Inf; raised on every rank at once, so no rank is left waiting."""


@dataclass
class _Arena:
    group: dist.ProcessGroup | None
    entries: dict[str, tuple[torch.Size, Callable[[torch.Tensor], None]]] = field(default_factory=dict)
    flat: torch.Tensor | None = None
    offsets: dict[str, int] = field(default_factory=dict)


class AmaxReducer:
    """Flat per-domain amax buffers and their sync. `collectives` counts the all-reduces issued."""

    def __init__(self, groups: ParallelGroups, device: torch.device | str = "cpu"):
        self.groups = groups
        self.device = torch.device(device)
        self.arenas: dict[str, _Arena] = {}
        self.collectives = 0

    def register(
        self, domain: str | None, key: str, shape: torch.Size, bind: Callable[[torch.Tensor], None]
    ) -> None:
        """Reserve a slot for `key` in `domain` (None: never reduced, only checked); `bind(view)` is called with
        its view once the buffer exists."""
        group = self.groups.domains[domain] if domain is not None else None
        arena = self.arenas.setdefault(domain or LOCAL, _Arena(group))
        if arena.flat is not None:
            raise RuntimeError("register every amax before allocate()")
        if key in arena.entries:
            raise ValueError(f"logical key {key!r} registered twice in domain {domain!r}")
        arena.entries[key] = (torch.Size(shape), bind)

    def allocate(self) -> None:
        """Lay every domain's amax out in key order in one flat float32 buffer and bind the views."""
        for arena in self.arenas.values():
            keys = sorted(arena.entries)
            sizes = [arena.entries[k][0].numel() for k in keys]
            arena.flat = torch.zeros(sum(sizes), dtype=torch.float32, device=self.device)
            offset = 0
            for key, size, part in zip(keys, sizes, arena.flat.split(sizes)):  # one split: 25,000 slices cost more
                shape, bind = arena.entries[key]
                arena.offsets[key] = offset
                bind(part.view(shape))
                offset += size

    def _all_reduce(self, tensor: torch.Tensor, group: dist.ProcessGroup | None) -> None:
        if group is not None:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
            self.collectives += 1

    def sync(self, check_finite: bool = True) -> None:
        """MAX over each domain, one all-reduce each. With check_finite, NaN (which MAX may drop) is sent as
        +Inf, and any non-finite result raises NonFiniteAmaxError on every rank, agreed through one flag over
        the whole world."""
        for arena in self.arenas.values():
            if check_finite:
                arena.flat.nan_to_num_(nan=float("inf"), posinf=float("inf"), neginf=float("inf"))
            self._all_reduce(arena.flat, arena.group)
        if check_finite:
            self._raise_if_non_finite()

    def _raise_if_non_finite(self) -> None:
        bad = [key for arena in self.arenas.values() for key in self._non_finite_keys(arena)]
        where = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "") if bad else None
        if not self.groups.alone and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([float(bool(bad))], device=self.device)
            self._all_reduce(flag, dist.group.WORLD)
            if flag.item() > 0:  # only then: the names, from the first rank that has some
                rank, where = first_error(where)
                where = f"{where} (on rank {rank})"
        if where:
            raise NonFiniteAmaxError(f"calibration data held NaN or Inf: amax of {where} is not finite")

    def _non_finite_keys(self, arena: _Arena) -> list[str]:
        if torch.isfinite(arena.flat).all():
            return []
        return [key for key, value in self.values(arena).items() if not torch.isfinite(value).all()]

    def values(self, arena: _Arena) -> dict[str, torch.Tensor]:
        """The amax of each key of an arena, as views."""
        return {
            key: arena.flat[offset : offset + arena.entries[key][0].numel()].view(arena.entries[key][0])
            for key, offset in arena.offsets.items()
        }
