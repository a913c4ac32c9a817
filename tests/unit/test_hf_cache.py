"""A checkpoint in huggingface_hub's cache (a snapshot of links into the repository's blobs/) is read as it is;
links anywhere else, into another repository included, are refused."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from dist_quant.bridge import BridgeError
from dist_quant.bridge.io import SafetensorsReader
from tests.reference.hf_cache import cache_snapshot

TENSORS = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}


def _sharded(directory):
    """A two-shard checkpoint as transformers writes it: a shard per tensor and the index."""
    directory.mkdir(parents=True)
    for i, (name, tensor) in enumerate(TENSORS.items()):
        save_file({name: tensor}, directory / f"model-0000{i + 1}-of-00002.safetensors", metadata={"format": "pt"})
    weight_map = {name: f"model-0000{i + 1}-of-00002.safetensors" for i, name in enumerate(TENSORS)}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def test_a_sharded_snapshot_of_the_cache_is_read(tmp_path):
    snapshot = cache_snapshot(tmp_path / "hub", "org/tiny", _sharded(tmp_path / "src"))
    assert all((snapshot / f).is_symlink() for f in os.listdir(snapshot))  # as huggingface_hub lays it out
    reader = SafetensorsReader(snapshot)
    assert sorted(reader.names()) == ["a", "b"]
    for name, tensor in TENSORS.items():
        assert torch.equal(reader.read(name), tensor)


def test_a_snapshot_in_a_folder_of_its_repository_is_read(tmp_path):
    """Models kept in a folder of their repository: `--hf-model .../snapshots/REV/folder`."""
    source = tmp_path / "src"
    _sharded(source / "folder")
    snapshot = cache_snapshot(tmp_path / "hub", "org/tiny", source)
    assert sorted(SafetensorsReader(snapshot / "folder").names()) == ["a", "b"]


@pytest.mark.parametrize("where", ["another repository's blobs", "outside the cache", "blobs/ a link elsewhere"])
def test_a_snapshot_link_anywhere_but_its_own_blobs_is_refused(tmp_path, where):
    snapshot = cache_snapshot(tmp_path / "hub", "org/tiny", _sharded(tmp_path / "src"))
    shard = snapshot / "model-00002-of-00002.safetensors"
    if where == "another repository's blobs":
        other = cache_snapshot(tmp_path / "hub", "org/other", _sharded(tmp_path / "other"))
        target = (other / shard.name).resolve()
        shard.unlink()
        shard.symlink_to(os.path.relpath(target, snapshot))
    elif where == "outside the cache":
        target = shard.resolve()
        shard.unlink()
        shard.symlink_to(shutil.copy(target, tmp_path / "elsewhere.safetensors"))
    else:  # the whole blobs/ moved elsewhere and linked back: its files are not the repository's
        blobs = snapshot.parents[1] / "blobs"
        blobs.rename(tmp_path / "moved-blobs")
        blobs.symlink_to(tmp_path / "moved-blobs")
    with pytest.raises(BridgeError, match=r": [ab] points outside the checkpoint directory"):
        SafetensorsReader(snapshot)
