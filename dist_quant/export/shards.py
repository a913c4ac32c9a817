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
import math
import os
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from dist_quant.bridge.io import SAFETENSORS_DTYPES
from dist_quant.export.buckets import Bucket
from dist_quant.export.problems import ExportError

_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


Entry = tuple[str, torch.dtype, tuple[int, ...], memoryview]  # name, dtype, shape, its bytes on the host


def write_safetensors(path: Path, entries: list[Entry], metadata: dict[str, str]) -> None:
    """One safetensors file from tensors' bytes on the host (slices of larger buffers, written in place), 0644."""
    ordered = sorted(entries, key=lambda entry: (-entry[1].itemsize, entry[0]))
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, data in ordered:
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for *_, data in ordered:
            f.write(data)
    os.chmod(path, 0o644)  # a checkpoint is for others to read


def host_entries(bucket: Bucket) -> list[Entry]:
    """A bucket on the host, as write_safetensors takes it: one memoryview of the buffer, sliced per tensor."""
    raw = memoryview(bucket.buffer.numpy())
    return [
        (name, dtype, shape, raw[offset : offset + math.prod(shape) * dtype.itemsize])
        for name, offset, shape, dtype in bucket.table
    ]


class ShardWriter:
    """Size-bounded safetensors shards of one rank, under temporary names (`prefix` tells ranks apart). Buckets
    reach the host in one transfer each (into pinned memory, which torch's host allocator recycles once a
    shard is written); full shards are written by WRITERS background threads (one thread's copies into the page
    cache do not fill a disk) while the caller goes on. At most one shard per thread is being written and one
    pending, so host memory stays within WRITERS + 1 shards.

    A write that fails (a full disk) stops the writing, not the caller: the caller goes on through the export's
    collectives, so that the other ranks are not left waiting for it, and `close` raises the error, for the
    ranks to agree on."""

    WRITERS = 2

    def __init__(self, directory: Path, max_shard_bytes: int, prefix: str = ""):
        self.directory, self.max_bytes, self.prefix = directory, max_shard_bytes, prefix
        self.pending: list[Entry] = []
        self.pending_bytes, self.files, self.total = 0, [], 0
        self.threads = ThreadPoolExecutor(max_workers=self.WRITERS, thread_name_prefix="dist_quant-shards")
        self.writing: list[tuple[Future, Path]] = []
        self.error: str | None = None  # the first failed write's, as the user is told it

    def add(self, bucket: Bucket) -> list[str]:
        """A bucket's tensors, in its table's order. -> their names."""
        host = bucket.buffer
        if host.is_cuda:
            host = torch.empty(host.shape, dtype=host.dtype, pin_memory=True).copy_(bucket.buffer, non_blocking=True)
        names = []
        for entry in host_entries(Bucket(host, bucket.table)):
            size = len(entry[3])
            if self.pending and self.pending_bytes + size > self.max_bytes:
                self._flush()
            self.pending.append(entry)
            self.pending_bytes += size
            self.total += size
            names.append(entry[0])
        return names

    def _flush(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.current_stream().synchronize()  # the transfers into the pending shard are done
        if len(self.writing) == self.WRITERS:
            self._wait(self.writing.pop(0))
        file = f"shard-{self.prefix}{len(self.files):05d}.safetensors"
        if self.error is None:  # after a failed write the rest is dropped: the export fails
            path = self.directory / file
            self.writing.append((self.threads.submit(write_safetensors, path, self.pending, {"format": "pt"}), path))
        self.files.append((file, [entry[0] for entry in self.pending]))
        self.pending, self.pending_bytes = [], 0

    def _wait(self, writing: tuple[Future, Path]) -> None:
        future, path = writing
        try:
            future.result()
        except OSError as error:
            self.error = self.error or write_error(error, path)

    def abandon(self) -> None:
        """Stop: the shards being written finish (their errors, if any, dropped), the pending one is not written."""
        self.threads.shutdown(wait=True)

    def close(self) -> tuple[list[tuple[str, list[str]]], int]:
        """Write what is pending and wait for the disk. -> (every shard file with its tensors, bytes written).
        Raises ExportError naming the first write that failed."""
        try:
            if self.pending:
                self._flush()
            for writing in self.writing:
                self._wait(writing)
        finally:
            self.threads.shutdown(wait=True)
        if self.error is not None:
            raise ExportError(self.error)
        return self.files, self.total


def write_error(error: OSError, path: Path) -> str:
    """A failed write as one line, what the system said and the file: `no space left on device writing
    /out/x.safetensors`."""
    reason = error.strerror or str(error)
    return f"{reason[:1].lower()}{reason[1:]} writing {path}"
