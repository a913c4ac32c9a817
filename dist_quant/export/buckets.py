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
    an unbind's scalars) are copied as one range, so tens of thousands of small tensors cost a few copies. Each
    run keeps its alignment modulo ALIGNMENT; a tensor listed twice (fused siblings' shared scale) is stored once."""
    located = []  # (name, tensor, storage address, byte offset in the storage, bytes)
    for name, tensor in tensors:
        tensor = tensor.detach().contiguous()
        start = tensor.storage_offset() * tensor.element_size()
        located.append((name, tensor, tensor.untyped_storage().data_ptr(), start, tensor.numel() * tensor.element_size()))
    runs: list[list] = []  # [storage tensor, start, end], in order of first appearance
    run_of: dict[int, int] = {}  # entry index -> run index
    by_storage: dict[int, list[int]] = {}
    for i, entry in enumerate(located):
        by_storage.setdefault(entry[2], []).append(i)
    for indices in by_storage.values():
        indices.sort(key=lambda i: located[i][3])
        current = None
        for i in indices:
            _, tensor, _, start, size = located[i]
            if current is None or start > runs[current][2]:
                runs.append([tensor, start, start + size])
                current = len(runs) - 1
            runs[current][2] = max(runs[current][2], start + size)
            run_of[i] = current
    parts, placed, offset = [], [], 0
    for tensor, start, end in runs:
        pad = (start - offset) % ALIGNMENT  # the run keeps its place modulo ALIGNMENT, hence every typed view's
        if pad:
            parts.append(torch.zeros(pad, dtype=torch.uint8, device=tensor.device))
        offset += pad
        storage = tensor.untyped_storage()
        parts.append(torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage, start, (end - start,)))
        placed.append(offset - start)  # bucket offset of byte 0 of the run's storage
        offset += end - start
    table = [
        (name, placed[run_of[i]] + start, tuple(tensor.shape), tensor.dtype)
        for i, (name, tensor, _, start, _) in enumerate(located)
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
