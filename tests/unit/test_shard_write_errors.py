"""A shard that cannot be written (a real ENOSPC: the shard's path is a link to /dev/full) stops the shard writer,
not its caller, who learns it at close, in one line."""

import pytest
import torch

from dist_quant.export import ExportError
from dist_quant.export.buckets import pack
from dist_quant.export.shards import ShardWriter


def test_a_full_disk_is_raised_at_close_naming_the_file(tmp_path):
    full = tmp_path / "shard-r00001-00000.safetensors"
    full.symlink_to("/dev/full")
    writer = ShardWriter(tmp_path, max_shard_bytes=64, prefix="r00001-")
    tensors = [(f"t{i}", torch.arange(16, dtype=torch.float32) + i) for i in range(4)]  # a shard each
    names = writer.add(pack(tensors[:2])) + writer.add(pack(tensors[2:]))  # the caller goes on
    assert names == ["t0", "t1", "t2", "t3"]
    with pytest.raises(ExportError) as raised:
        writer.close()
    assert str(raised.value) == f"no space left on device writing {full}"
