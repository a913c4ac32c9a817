"""Cutting a full tensor into tensor-parallel shards and putting shards back together.

A stride-2 tensor is two stacked halves (gate and up of a gated MLP) each split on its own: rank r holds
[gate_r; up_r], so chunking the gathered tensor in two would be wrong for more than one rank.
"""

from __future__ import annotations

import torch


def shard(full: torch.Tensor, dim: int, rank: int, size: int, stride: int = 1) -> torch.Tensor:
    """This rank's piece of `full` split `size` ways along `dim`."""
    parts = full.chunk(stride, dim)
    for part in parts:
        if part.shape[dim] % size:
            raise ValueError(f"dim {dim} of shape {tuple(full.shape)} (stride {stride}) does not split {size} ways")
    return torch.cat([part.chunk(size, dim)[rank] for part in parts], dim)


def unshard(pieces: list[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """The full tensor from every rank's piece, in rank order: the inverse of `shard`."""
    halves = [piece.chunk(stride, dim) for piece in pieces]
    return torch.cat([torch.cat([h[i] for h in halves], dim) for i in range(stride)], dim)
