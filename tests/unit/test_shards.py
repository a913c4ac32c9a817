"""The shard writer against safetensors' own reader: every dtype the checkpoint format uses, scalars, empty
tensors, views of one buffer (and one tensor twice), each tensor aligned to its element size."""

import json
import struct

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dist_quant.export.buckets import pack
from dist_quant.export.shards import ShardWriter, host_entries, write_safetensors


def _tensors(gen):
    scales = torch.rand(5, generator=gen)
    return [
        ("packed", torch.randint(0, 256, (6, 8), generator=gen, dtype=torch.uint8)),
        ("block_scale", torch.rand(6, 1, generator=gen).to(torch.float8_e4m3fn)),
        ("scale_2", scales[1]),
        ("sibling.scale_2", scales[1]),
        ("input_scale", scales[3]),
        ("norm", torch.randn(7, generator=gen).to(torch.bfloat16)),
        ("embed", torch.randn(3, 5, generator=gen, dtype=torch.float64)),
        ("empty", torch.zeros(0, 4)),
    ]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_a_shard_reads_back_as_written_and_aligned(tmp_path, gen):
    tensors = _tensors(gen)
    write_safetensors(tmp_path / "a.safetensors", host_entries(pack(tensors)), {"format": "pt"})
    loaded = load_file(tmp_path / "a.safetensors")
    assert loaded.keys() == dict(tensors).keys() and all(_same(loaded[n], t) for n, t in tensors)
    raw = (tmp_path / "a.safetensors").read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + length])
    assert length % 8 == 0 and header.pop("__metadata__") == {"format": "pt"}
    for name, entry in header.items():
        begin = entry["data_offsets"][0]
        assert (8 + length + begin) % dict(tensors)[name].element_size() == 0, name
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o644


def test_buckets_split_into_size_bounded_shards(tmp_path, gen):
    tensors = _tensors(gen)
    writer = ShardWriter(tmp_path, max_shard_bytes=64)
    names = writer.add(pack(tensors[:4])) + writer.add(pack(tensors[4:]))
    files, total = writer.close()
    assert names == [n for n, _ in tensors] and len(files) > 1
    assert total == sum(t.numel() * t.element_size() for _, t in tensors)
    read = {}
    for file, held in files:
        with safe_open(tmp_path / file, "pt") as f:
            assert sorted(f.keys()) == sorted(held)
            read |= {n: f.get_tensor(n) for n in f.keys()}
    assert all(_same(read[n], t) for n, t in tensors)
