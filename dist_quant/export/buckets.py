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
    """The tensors' bytes in one buffer, copied in one concatenation (one launch on a GPU) of a few memory runs:
    tensors that lie back to back in one storage (the pieces of one quantized layer, the scales of its experts,
    an unbind's scalars) are copied as one range, so tens of thousands of small tensors cost a few copies and a
    few microseconds of host time each. Each run keeps its alignment modulo ALIGNMENT; a tensor listed twice
    (fused siblings' shared scale) is stored once."""
    located = []  # (storage address, byte offset in the storage, bytes, entry index)
    held = []
    for i, (_, tensor) in enumerate(tensors):
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        held.append(tensor)
        size = tensor.element_size()
        start = tensor.storage_offset() * size
        located.append((tensor.data_ptr() - start, start, tensor.numel() * size, i))
    located.sort()
    runs: list[list] = []  # [a tensor of the run's storage, start, end]
    run_of = [0] * len(tensors)
    storage = None
    for address, start, size, i in located:
        if address != storage or start > runs[-1][2]:
            runs.append([held[i], start, start + size])
            storage = address
        runs[-1][2] = max(runs[-1][2], start + size)
        run_of[i] = len(runs) - 1
    parts, placed, offset = [], [], 0
    for tensor, start, end in runs:
        pad = (start - offset) % ALIGNMENT  # the run keeps its place modulo ALIGNMENT, hence every typed view's
        if pad:
            parts.append(torch.zeros(pad, dtype=torch.uint8, device=tensor.device))
        offset += pad
        raw = torch.empty(0, dtype=torch.uint8, device=tensor.device)
        parts.append(raw.set_(tensor.untyped_storage(), start, (end - start,)))
        placed.append(offset - start)  # bucket offset of byte 0 of the run's storage
        offset += end - start
    table = [
        (name, placed[run_of[i]] + tensor.storage_offset() * tensor.element_size(), tuple(tensor.shape), tensor.dtype)
        for i, ((name, _), tensor) in enumerate(zip(tensors, held))
    ]
    return Bucket(torch.cat(parts) if len(parts) > 1 else parts[0].clone(), table)


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
