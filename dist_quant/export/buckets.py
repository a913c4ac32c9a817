"""Many tensors in one flat byte buffer, and a table of where each lies: the unit in which a refit reaches an
engine (one copy or one broadcast per bucket) and in which an export moves a layer from the GPU to the host (one
transfer instead of one per tensor)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

ALIGNMENT = 16  # bytes: every tensor of a bucket starts at a multiple, so typed views of it are aligned


@dataclass
class Bucket:
    """`buffer`: uint8, 1-D. `table`: (name, byte offset, shape, dtype) of each tensor, in order."""

    buffer: torch.Tensor
    table: list[tuple[str, int, tuple[int, ...], torch.dtype]]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, a view of the buffer) for each tensor."""
        for name, offset, shape, dtype in self.table:
            yield name, self.buffer[offset : offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)

    def to(self, device: torch.device | str) -> "Bucket":
        return Bucket(self.buffer.to(device), self.table)


def aligned_size(tensor: torch.Tensor) -> int:
    return -(-tensor.numel() * tensor.element_size() // ALIGNMENT) * ALIGNMENT


def pack(tensors: list[tuple[str, torch.Tensor]]) -> Bucket:
    """The tensors' bytes in one concatenation (one launch on a GPU), each padded to the alignment."""
    padding = torch.zeros(ALIGNMENT, dtype=torch.uint8, device=tensors[0][1].device)
    parts, table, offset = [], [], 0
    for name, tensor in tensors:
        raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        table.append((name, offset, tuple(tensor.shape), tensor.dtype))
        parts.append(raw)
        pad = -raw.numel() % ALIGNMENT
        if pad:
            parts.append(padding[:pad])
        offset += raw.numel() + pad
    return Bucket(torch.cat(parts), table)


def bucketed(tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[Bucket]:
    """The tensors, in order, in buckets of at most `bucket_bytes` (a larger tensor gets a bucket of its own)."""
    if bucket_bytes < ALIGNMENT:
        raise ValueError(f"bucket_bytes must be at least {ALIGNMENT}, got {bucket_bytes}")
    pending: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in tensors:
        nbytes = aligned_size(tensor)
        if pending and size + nbytes > bucket_bytes:
            yield pack(pending)
            pending, size = [], 0
        pending.append((name, tensor))
        size += nbytes
    if pending:
        yield pack(pending)
