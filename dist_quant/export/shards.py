"""Safetensors shards written from host buffers, by a background thread.

An export moves its tensors to the host a bucket at a time (a flat buffer and a table, `buckets.Bucket`); the
shards are written straight from those buffers while the next layers are quantized and moved: no copy per
tensor, no Python work per tensor beyond a header entry and a write, and the disk busy all along. The file
layout is safetensors' own: an 8-byte little-endian header length, a JSON header (padded with spaces to a
multiple of 8 bytes) giving each tensor's dtype, shape and [begin, end) byte range in the data that follows, the
data tightly packed. Tensors are ordered as safetensors orders them (larger elements first, then by name), so
every tensor starts at a multiple of its element size.
"""

from __future__ import annotations

import json
import os
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from dist_quant.bridge.io import SAFETENSORS_DTYPES
from dist_quant.export.buckets import Bucket

_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def write_safetensors(path: Path, tensors: list[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> None:
    """One safetensors file of host tensors (contiguous; views of larger buffers are written in place), 0644."""
    ordered = sorted(tensors, key=lambda item: (-item[1].element_size(), item[0]))
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, tensor in ordered:
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for _, tensor in ordered:
            if tensor.numel():
                f.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    os.chmod(path, 0o644)  # a checkpoint is for others to read


class ShardWriter:
    """Size-bounded safetensors shards of one rank, under temporary names (`prefix` tells ranks apart). Buckets
    reach the host in one transfer each (into pinned memory, which torch's host allocator recycles once a
    shard is written); a full shard is written by a background thread while the caller goes on. At most one
    shard is pending and one being written, so host memory stays within about two shards."""

    def __init__(self, directory: Path, max_shard_bytes: int, prefix: str = ""):
        self.directory, self.max_bytes, self.prefix = directory, max_shard_bytes, prefix
        self.pending: list[tuple[str, torch.Tensor]] = []
        self.pending_bytes, self.files, self.total = 0, [], 0
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dist_quant-shards")
        self.writing: Future | None = None

    def add(self, bucket: Bucket) -> list[str]:
        """A bucket's tensors, in its table's order. -> their names."""
        host = bucket.buffer
        if host.is_cuda:
            host = torch.empty(host.shape, dtype=host.dtype, pin_memory=True).copy_(bucket.buffer, non_blocking=True)
        names = []
        for name, tensor in Bucket(host, bucket.table).tensors():
            size = tensor.numel() * tensor.element_size()
            if self.pending and self.pending_bytes + size > self.max_bytes:
                self._flush()
            self.pending.append((name, tensor))
            self.pending_bytes += size
            self.total += size
            names.append(name)
        return names

    def _flush(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.current_stream().synchronize()  # the transfers into the pending shard are done
        self._wait()
        file = f"shard-{self.prefix}{len(self.files):05d}.safetensors"
        self.writing = self.thread.submit(write_safetensors, self.directory / file, self.pending, {"format": "pt"})
        self.files.append((file, [name for name, _ in self.pending]))
        self.pending, self.pending_bytes = [], 0

    def _wait(self) -> None:
        if self.writing is not None:
            writing, self.writing = self.writing, None
            writing.result()  # the thread's error, if any, is the caller's

    def abandon(self) -> None:
        """Stop: the shard being written finishes (its error, if any, dropped), the pending one is not written."""
        self.thread.shutdown(wait=True)

    def close(self) -> tuple[list[tuple[str, list[str]]], int]:
        """Write what is pending and wait for the disk. -> (every shard file with its tensors, bytes written)."""
        try:
            if self.pending:
                self._flush()
            self._wait()
        finally:
            self.thread.shutdown(wait=True)
        return self.files, self.total
