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

from dist_quant.calibrate.pipeline import weights_by_quantizer
from dist_quant.modules import QuantModule
from dist_quant.modules.base import model_device
from dist_quant.parallel.agree import every_rank, first_error, with_rank
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


class QuantStateError(ValueError):
    """Saved quantizer state that cannot be restored into this model: one line naming the file or quantizer."""


def weight_shapes(model: nn.Module, groups: ParallelGroups) -> dict[str, tuple[int, ...]]:
    """The full (unsharded) shape of every quantized module's weight, by logical name: what a restore checks."""
    shapes = {}
    for _, module in model.named_modules():
        if isinstance(module, QuantModule):
            layout = module.layout
            for _, weight in module.weight_quantizers():
                shape = list(weight.shape)
                if layout.shard_dim is not None:
                    shape[layout.shard_dim] *= groups.size(layout.shard_group)
                shapes[layout.logical_name] = tuple(shape)
    return shapes


def save_quant_state(model: nn.Module, directory: str | os.PathLike, groups: ParallelGroups | None = None) -> Path:
    """Every rank writes its quantizer buffers, with logical names and splits, and the full shapes of the
    quantized weights, to `directory` (tensors and plain containers only: loaded without unpickling code).
    Collective."""
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
    saved = {"world": dist.get_world_size() if dist.is_initialized() else 1, "state": state, "weights": weight_shapes(model, groups)}
    torch.save(saved, directory / FILE_PATTERN.format(rank=rank))
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
        if index in seen and not _same_bits(seen[index], value):
            raise QuantStateError(f"ranks saved different copies of {key}")
        seen[index] = value
        splits[key] = split
    return {
        key: by_piece[0] if splits[key] is None else unshard([by_piece[i] for i in sorted(by_piece)], *splits[key])
        for key, by_piece in pieces.items()
    }


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, NaN included (torch.equal says NaN differs from itself)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _read_files(directory: Path) -> tuple[list[tuple[str, torch.Tensor, tuple | None, int]], dict]:
    """-> (every rank's entries, the saved weight shapes). Files are loaded with weights_only: a file that is
    not plain tensors and containers is refused, never run."""
    files = sorted(directory.glob("quant_state.rank*.pt"))
    if not files:
        raise FileNotFoundError(f"{directory}: no quant_state.rank*.pt files")
    entries, shapes = [], {}
    for file in files:
        try:
            saved = torch.load(file, weights_only=True)
            world, state, saved_shapes = saved["world"], saved["state"], saved["weights"]
            entries += [(key, e["tensor"], e["split"], e["piece"][0]) for key, e in state.items()]
        except Exception as error:  # noqa: BLE001 - unpickling refused, truncated file, another layout
            raise QuantStateError(f"{file}: not a quant-state file of dist_quant ({type(error).__name__}: {error})") from None
        if world != len(files):
            raise QuantStateError(f"{directory}: {len(files)} rank files, but they were saved by {world} ranks")
        shapes.update(saved_shapes)
    return entries, shapes


def _check_model(directory: Path, model_keys: set[str], saved_keys: set[str], here: dict, saved: dict) -> None:
    """The saved state was taken from a model like this one: same quantized weights and shapes, same
    quantizers (a model of another depth, width or expert count fails here, before anything is loaded)."""
    for name in sorted(here.keys() & saved.keys()):
        if tuple(here[name]) != tuple(saved[name]):
            raise QuantStateError(f"{directory}: {name} has weight shape {tuple(here[name])} here, {tuple(saved[name])} when saved")
    extra, missing = sorted(saved_keys - model_keys), sorted(model_keys - saved_keys)
    for keys, what in ((extra, "quantizers this model lacks"), (missing, "no saved amax for quantizers of this model")):
        if keys:
            raise QuantStateError(f"{directory}: {what}: {len(keys)}, e.g. {keys[0]} (saved from another model or recipe?)")


def restore_quant_state(model: nn.Module, directory: str | os.PathLike, groups: ParallelGroups | None = None) -> int:
    """Load state saved by `save_quant_state`, at any TP/EP layout, into a model with the same quantizers
    attached (in this rank's layout, pipeline stages included), and switch them to fake quantization. A model
    that does not match the saved one (names, weight shapes, expert counts) raises QuantStateError before
    anything is loaded. Collective. -> buffers restored."""
    groups = groups or default_groups()
    directory = Path(directory)
    entries, saved_shapes = _read_files(directory)
    try:
        full = assemble(iter(entries))
    except (RuntimeError, IndexError) as error:  # pieces whose saved split does not fit them
        raise QuantStateError(f"{directory}: the saved pieces do not assemble ({error})") from None
    model_amax = {key for key, _, buffer, _ in quantizer_buffers(model) if buffer == "_amax"}
    here = weight_shapes(model, groups)
    everyone = every_rank((model_amax, here))  # ranks hold other experts, stages other layers
    model_amax = set().union(*(keys for keys, _ in everyone))
    here = {name: shape for _, shapes in everyone for name, shape in shapes.items()}
    saved_amax = {key for key in full if key.endswith("._amax")}
    _check_model(directory, model_amax, saved_amax, here, saved_shapes)
    values, problem = _this_ranks_values(model, full, groups)
    first = first_error(problem)  # a piece of one rank only may be bad: every rank stops, nothing loaded
    if first is not None:
        raise QuantStateError(f"{directory}: {with_rank(first)}")
    device = model_device(model)
    for q, buffer, value in values:
        q.load_state_dict({buffer: value}, strict=False)
        q.to(device)
    for _, q, _, _ in quantizer_buffers(model):
        q.mode = QuantizerMode.QUANTIZING
    return len(values)


def _this_ranks_values(model: nn.Module, full: dict[str, torch.Tensor], groups: ParallelGroups):
    """-> ([(quantizer, buffer, this rank's piece)], the first problem or None): each piece checked against the
    shape the quantizer's format and weight give it (saved split metadata can be wrong), finite and not
    negative."""
    weights = weights_by_quantizer(model)
    values = []
    for key, q, buffer, split in quantizer_buffers(model):
        if key not in full:
            continue
        value = full[key]
        expected = q.buffer_shape(buffer, weights.get(id(q)))
        try:
            if split:
                value = shard(value, split[0], groups.rank(split[2]), groups.size(split[2]), split[1])
        except (RuntimeError, IndexError, ValueError) as error:
            return [], f"{key}: saved as split along dim {split[0]}, which its shape {tuple(value.shape)} does not allow ({error})"
        if expected is None or value.shape != expected:
            return [], f"{key}: this rank's piece has shape {tuple(value.shape)}, the quantizer here takes {None if expected is None else tuple(expected)}"
        if not (torch.isfinite(value).all() and (value >= 0).all()):
            return [], f"{key}: an amax must be finite and not negative"
        values.append((q, buffer, value))
    return values, None
