"""Amax, the statistic of max calibration: the largest magnitude of a tensor, or of each segment of its rows, in
float32. NaN propagates (a NaN anywhere makes that amax NaN, which the driver then reports by name); a segment
without rows has amax 0, below any other (its quantizer saw no data, which the caller knows from the counts)."""

from __future__ import annotations

import torch


def tensor_amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| as a float32 scalar (one kernel on CUDA)."""
    return torch.linalg.vector_norm(x, float("inf"), dtype=torch.float32)


def segment_amax(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """x [rows, n] whose rows are consecutive segments of `lengths[s]` rows -> [segments] float32: each
    segment's max |x|."""
    rows = torch.linalg.vector_norm(x, float("inf"), dim=-1, dtype=torch.float32)
    return torch.segment_reduce(rows, "max", lengths=lengths.to(rows.device), unsafe=True, initial=0.0)
