"""Shared quant states: one NVFP4 global amax for sibling quantizers that inference engines fuse."""

from __future__ import annotations

import torch
from torch import nn


class SharedQuantState(nn.Module):
    """The global amax of a group of siblings (q/k/v, gate/up, an expert's w1/w3), held by the group's parent
    module under `shared_<role>_state`. Runtime state: its buffer is not saved; each member's own `_global_amax`
    carries the value into checkpoints, and a model restored from one needs no shared state to quantize."""

    def __init__(self, key: str, members: list[str], global_amax: torch.Tensor):
        super().__init__()
        self.key = key
        self.members = members
        self.register_buffer("global_amax", global_amax, persistent=False)

    def extra_repr(self) -> str:
        return f"{self.key}: {len(self.members)} members, global_amax={self.global_amax.item():.3g}"
