"""Quantizer state under logical names: saved per rank, restored into the same or another TP/EP layout.

Each buffer is recorded with how it is split: per-tensor amax are whole on every rank; static block amax, and
per-channel amax along a sharded dim, are split like their weight. Restoring assembles every logical tensor from
all ranks' files and cuts this rank's piece for its current layout.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from dist_quant.modules import QuantModule
from dist_quant.modules.base import model_device
from dist_quant.parallel.groups import ParallelGroups, default_groups
from dist_quant.parallel.layout import shard, unshard
from dist_quant.quantizer import AMAX_BUFFERS, QuantizerMode, TensorQuantizer

FILE_PATTERN = "quant_state.rank{rank:05d}.pt"


def quantizer_buffers(model: nn.Module) -> Iterator[tuple[str, TensorQuantizer, str, tuple | None]]:
    """(logical key, quantizer, buffer name, split) for every enabled quantizer's buffers; split is
    (dim, stride, group) where the buffer is divided like its weight, None where it is whole on every rank."""
    for _, module in model.named_modules():
        if not isinstance(module, QuantModule):
            continue
        layout = module.layout
        for attr, q in module.named_children():
            if not isinstance(q, TensorQuantizer) or not q.enabled:
                continue
            for buffer in AMAX_BUFFERS:
                split = layout.shard_dim is not None and attr == "weight_quantizer" and (
                    buffer == "_block_amax" or (buffer == "_amax" and q.fmt.axis == layout.shard_dim)
                )
                split_as = (layout.shard_dim, layout.stride, layout.shard_group) if split else None
                yield f"{layout.logical_name}.{attr}.{buffer}", q, buffer, split_as


def save_quant_state(model: nn.Module, directory: str | os.PathLike, groups: ParallelGroups | None = None) -> Path:
    """Every rank writes its quantizer buffers, with logical names and splits, to `directory`. Collective."""
    groups = groups or default_groups()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rank = dist.get_rank() if dist.is_initialized() else 0
    state = {}
    for key, q, buffer, split in quantizer_buffers(model):
        value = getattr(q, buffer)
        if value is not None:
            piece = (groups.rank(split[2]), groups.size(split[2])) if split else (0, 1)
            state[key] = {"tensor": value.detach().cpu().clone(), "split": split and split[:2], "piece": piece}
    torch.save({"world": dist.get_world_size() if dist.is_initialized() else 1, "state": state}, directory / FILE_PATTERN.format(rank=rank))
    if dist.is_initialized():
        dist.barrier()
    return directory


def assemble(entries: Iterator[tuple[str, torch.Tensor, tuple | None, int]]) -> dict[str, torch.Tensor]:
    """Full logical tensors from (key, piece, (dim, stride) or None, piece index) of all ranks. Copies of one
    piece held by several ranks must agree bit for bit."""
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    splits = {}
    for key, value, split, index in entries:
        seen = pieces.setdefault(key, {})
        if index in seen and not torch.equal(seen[index], value):
            raise ValueError(f"ranks disagree on {key}")
        seen[index] = value
        splits[key] = split
    return {
        key: by_piece[0] if splits[key] is None else unshard([by_piece[i] for i in sorted(by_piece)], *splits[key])
        for key, by_piece in pieces.items()
    }


def _read_files(directory: Path) -> Iterator[tuple[str, torch.Tensor, tuple | None, int]]:
    files = sorted(directory.glob("quant_state.rank*.pt"))
    if not files:
        raise FileNotFoundError(f"{directory}: no quant_state.rank*.pt files")
    for file in files:
        saved = torch.load(file, weights_only=False)
        if saved["world"] != len(files):
            raise ValueError(f"{directory}: {len(files)} rank files, but they were saved by {saved['world']} ranks")
        for key, entry in saved["state"].items():
            yield key, entry["tensor"], entry["split"], entry["piece"][0]


def restore_quant_state(model: nn.Module, directory: str | os.PathLike, groups: ParallelGroups | None = None) -> int:
    """Load state saved by `save_quant_state`, at any TP/EP layout, into a model with the same quantizers
    attached (in this rank's layout), and switch them to fake quantization. -> buffers restored."""
    groups = groups or default_groups()
    full = assemble(_read_files(Path(directory)))
    device = model_device(model)
    restored = 0
    for key, q, buffer, split in quantizer_buffers(model):
        if key not in full:
            continue
        value = full[key]
        if split:
            value = shard(value, split[0], groups.rank(split[2]), groups.size(split[2]), split[1])
        q.load_state_dict({buffer: value}, strict=False)
        q.to(device)
        restored += 1
    missing = [key for key, q, buffer, _ in quantizer_buffers(model) if buffer == "_amax" and q._amax is None]
    if missing:
        raise ValueError(f"{directory}: no saved amax for {len(missing)} quantizers, e.g. {missing[0]}")
    for _, q, _, _ in quantizer_buffers(model):
        q.mode = QuantizerMode.QUANTIZING
    return restored
