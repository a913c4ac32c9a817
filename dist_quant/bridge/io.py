"""Moving weights across the bridge: Hugging Face checkpoint -> this rank's Megatron shards (lazy reads), and the
sharded Megatron model -> a stream of full Hugging Face tensors on one rank (gathered piece by piece)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from dist_quant.bridge.config import DTYPES
from dist_quant.bridge.fp8_source import SCALE_SUFFIX, FP8BlockReader
from dist_quant.bridge.mappings import BridgeError, Mapping, ShardInfo
from dist_quant.bridge.models import ModelBridge
from dist_quant.modules.base import model_device, structure_version
from dist_quant.modules.megatron import experts_per_rank, logical_namer
from dist_quant.parallel.agree import every_rank
from dist_quant.parallel.groups import GROUP_NAMES, ParallelGroups, group_ranks
from dist_quant.parallel.layout import unshard


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "BOOL": torch.bool,
}
INDEX_FILE, SINGLE_FILE = "model.safetensors.index.json", "model.safetensors"
# The dtypes a source checkpoint's tensors are read in: those the bridge computes in and exports unquantized
# tensors in. FP8 weights are quantized already: read only as an FP8 block-scaled checkpoint's, dequantized
# (source_reader); float64 and integer tensors are no weights to calibrate.
SOURCE_DTYPES = tuple(DTYPES.values())


def unread_dtype(where: str, dtype: torch.dtype | str) -> BridgeError:
    """The error for a source tensor (`where`: its name and file) of a dtype dist_quant does not read."""
    quantized = "F8" in str(dtype) or "float8" in str(dtype)
    return BridgeError(
        f"{where}: {dtype}, not a dtype dist_quant reads ({', '.join(DTYPES)})"
        + (
            ": FP8 tensors are quantized already, and read only from an FP8 block-scaled checkpoint (config.json's "
            "quantization_config with quant_method 'fp8' and weight_block_size, each FP8 weight with its float32 "
            "weight_scale_inv)" if quantized else ""
        )
    )


def has_safetensors(directory: str | Path) -> bool:
    return (Path(directory) / INDEX_FILE).is_file() or (Path(directory) / SINGLE_FILE).is_file()


def is_inside(path: Path, root: Path) -> bool:
    """Whether `path` is `root` or lies below it."""
    return path == root or root in path.parents


def is_checkpoint_file(path: Path, directory: Path) -> bool:
    """Whether `path`, a file the checkpoint `directory` names, is the checkpoint's own, links followed: it lies
    inside the directory or, in a snapshot of the Hugging Face cache (`models--ORG--NAME/snapshots/REVISION/`,
    whose files huggingface_hub makes links to `../../blobs/HASH`), in the blobs/ of the same repository. Nothing
    else: not a link to another file of the user's, nor into another repository or snapshot."""
    real, root = path.resolve(), directory.resolve()
    if is_inside(real, root):
        return True
    snapshots = next((p for p in root.parents if p.name == "snapshots"), None)
    return (
        snapshots is not None and snapshots.parent.name.startswith("models--")
        and real.parent == snapshots.parent / "blobs"  # blobs/ itself a link resolves elsewhere: refused
    )


class SafetensorsReader:
    """A Hugging Face checkpoint directory (single file or sharded with an index), read lazily by slice. Index
    entries must name files inside the directory; unreadable files and entries are BridgeErrors naming them."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        index = directory / INDEX_FILE
        if index.is_file():
            self._files = self._index(index)
        elif (directory / SINGLE_FILE).is_file():
            self._files = dict.fromkeys(self._opened(directory / SINGLE_FILE).keys(), directory / SINGLE_FILE)
        else:
            raise BridgeError(f"{directory}: no model.safetensors or model.safetensors.index.json")
        self._open = {}

    @staticmethod
    def _index(index: Path) -> dict[str, Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except RecursionError:
            raise BridgeError(f"{index}: not a safetensors index (JSON nested too deep to read)") from None
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
            raise BridgeError(f"{index}: not a safetensors index ({type(error).__name__}: {error})") from None
        if not isinstance(weight_map, dict):
            raise BridgeError(f"{index}: weight_map is not an object")
        files = {}
        for name, file in weight_map.items():
            path = index.parent / str(file)
            if not isinstance(file, str) or Path(file).is_absolute() or not is_checkpoint_file(path, index.parent):
                raise BridgeError(f"{index}: {name} points outside the checkpoint directory ({file!r})")
            if not path.is_file():
                raise BridgeError(f"{index}: {name} is in {file}, which does not exist")
            files[name] = path
        return files

    @staticmethod
    def _opened(path: Path):
        from safetensors import safe_open

        try:
            return safe_open(path, "pt")
        except Exception as error:  # safetensors raises its own error types for broken files
            raise BridgeError(f"{path}: not a readable safetensors file ({error})") from None

    def names(self) -> list[str]:
        return list(self._files)

    def where(self, name: str) -> str:
        """A tensor as an error names it: after its file."""
        return f"{self._files[name]}: {name}"

    def _slice(self, name: str):
        if name not in self._files:
            raise BridgeError(f"the checkpoint has no tensor {name!r}")
        path = self._files[name]
        if path not in self._open:
            self._open[path] = self._opened(path)
        try:
            return self._open[path].get_slice(name)
        except Exception:  # noqa: BLE001 - the index says the file holds it; it does not
            raise BridgeError(f"{path}: holds no tensor {name!r}, though the index says it does") from None

    def shape(self, name: str) -> torch.Size:
        return torch.Size(self._slice(name).get_shape())

    def stored_dtype(self, name: str) -> str:
        """The dtype as the file names it (safetensors' name: F32, F8_E4M3, ...)."""
        return self._slice(name).get_dtype()

    def dtype(self, name: str) -> torch.dtype:
        stored = self.stored_dtype(name)
        if stored not in SAFETENSORS_DTYPES:
            raise unread_dtype(self.where(name), stored)
        return SAFETENSORS_DTYPES[stored]

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        piece = self._slice(name)
        try:
            if dim is None:
                return piece[:]
            return piece[start:stop] if dim == 0 else piece[:, start:stop]
        except Exception as error:  # noqa: BLE001 - e.g. a file cut short
            raise BridgeError(f"{self._files[name]}: cannot read {name} ({error})") from None


def source_reader(directory: str | Path, bridge: ModelBridge) -> SafetensorsReader | FP8BlockReader:
    """The reader of a source checkpoint, as its config.json (`bridge`) describes it: an FP8 block-scaled one
    read as the unquantized checkpoint it stands for, its FP8 weights dequantized to the checkpoint's dtype
    (bridge/fp8_source.py); any other as stored."""
    reader = SafetensorsReader(directory)
    block = bridge.config.fp8_block
    if block is None:
        return reader
    return FP8BlockReader(reader, block, bridge.dtype, bridge.kv_scale_names() if bridge.config.fp8_kv_cache else set())


class StateDictReader:
    """In-memory Hugging Face tensors (e.g. a transformers model's state_dict, as checkpoint names)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def where(self, name: str) -> str:
        return name

    def _tensor(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise BridgeError(f"no tensor {name!r}")
        return self.tensors[name]

    def shape(self, name: str) -> torch.Size:
        return self._tensor(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._tensor(name).dtype

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        tensor = self.tensors[name]
        return tensor if dim is None else tensor.narrow(dim, start, stop - start)


def shard_info(model: nn.Module, groups: ParallelGroups) -> ShardInfo:
    return ShardInfo(
        tp_rank=groups.rank("tp"), tp_size=groups.size("tp"), etp_rank=groups.rank("etp"),
        etp_size=groups.size("etp"), ep_rank=groups.rank("ep"), experts_per_rank=experts_per_rank(model),
    )


def _state(model: nn.Module, ep_rank: int, quant_state: bool = False) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers under their logical names; quantizer buffers only with quant_state."""
    logical_name = logical_namer(model, ep_rank)
    return {
        logical_name(name): tensor
        for name, tensor in model.state_dict(keep_vars=True).items()
        if isinstance(tensor, torch.Tensor)
        and not name.endswith("_extra_state")
        and (quant_state or "_quantizer." not in name)
    }


def check_checkpoint(bridge: ModelBridge, reader) -> list[str]:
    """The checkpoint holds exactly the tensors its config.json describes, with their shapes, in a dtype it is read
    in (SOURCE_DTYPES): BridgeError naming the first that is missing, extra, of another shape or dtype (headers
    only).
    -> the tensors left out as outside the forward (multi-token-prediction layers)."""
    expected = bridge.hf_tensor_shapes()
    left_out = [name for name in reader.names() if name not in expected and bridge.outside_forward(name)]
    stored = set(reader.names()) - set(left_out)
    missing, extra = sorted(expected.keys() - stored), sorted(stored - expected.keys())
    if missing:
        raise BridgeError(f"the checkpoint lacks {missing[0]}" + (f" and {len(missing) - 1} more tensors" if len(missing) > 1 else "") + ", which config.json describes")
    if extra:
        raise BridgeError(
            f"the checkpoint holds {extra[0]}" + (f" and {len(extra) - 1} more tensors" if len(extra) > 1 else "")
            + ", which config.json does not describe"
            + (" (the block scales of an FP8 checkpoint, which its quantization_config would declare)"
               if extra[0].endswith(SCALE_SUFFIX) else "")
        )
    for name, shape in expected.items():
        if reader.shape(name) != shape:
            raise BridgeError(f"{name}: shape {tuple(reader.shape(name))}, config.json describes {tuple(shape)}")
        if reader.dtype(name) not in SOURCE_DTYPES:
            raise unread_dtype(reader.where(name), reader.dtype(name))
    return left_out


def load_hf_weights(
    model: nn.Module, bridge: ModelBridge, reader, groups: ParallelGroups,
    on_progress: Callable[[int, int], object] | None = None,
) -> list[str]:
    """Fill a sharded megatron model from an HF checkpoint; each rank reads only the slices it holds, after
    checking the whole checkpoint against config.json. BridgeError names what is unmapped, missing, extra, of
    another shape or dtype, or not finite. `on_progress(done, total)` after each of this rank's tensors.
    -> the checkpoint's tensors left out (multi-token-prediction layers)."""
    registry = bridge.registry()
    weights = _state(model, groups.rank("ep"))
    left_out = check_checkpoint(bridge, reader)
    registry.check(megatron_names=weights, hf_names=[n for n in reader.names() if n not in left_out])
    info = shard_info(model, groups)
    with torch.no_grad():
        for done, (name, tensor) in enumerate(weights.items(), 1):
            mapping, _, hf_names = registry.megatron_to_hf(name)
            piece = mapping.load(reader, hf_names, info)
            if not torch.isfinite(piece).all():
                raise BridgeError(f"{', '.join(hf_names)}: NaN or Inf in the checkpoint's weights")
            if piece.shape != tensor.shape:
                raise BridgeError(
                    f"{name}: {', '.join(hf_names)} give shape {tuple(piece.shape)} on this rank, the model has "
                    f"{tuple(tensor.shape)}"
                )
            tensor.copy_(piece)
            if on_progress is not None:
                on_progress(done, len(weights))
    return left_out


@dataclass(frozen=True)
class Planned:
    """One logical Megatron tensor of an export stream: who holds its pieces, who yields it, its HF side."""

    name: str
    mapping: Mapping
    hf_names: tuple[str, ...]
    sources: tuple[int, ...]  # global ranks of model replica 0 holding its pieces, in piece order
    shapes: tuple[tuple[int, ...], ...]  # each source's piece
    dtype: torch.dtype
    target: int  # the rank that yields it


class ExportPlan:
    """What an export stream moves, worked out once per model and layout (one collective) and reused: a 30B MoE
    streams ~75,000 tensors, and finding each one's mapping and holders costs more than moving it. This rank's
    tensors are looked up where the model keeps them (`slots`) at every stream, so new values, and the new
    tensors a recalibration puts in place, are what streams; a plan whose tensors changed shape, dtype or
    presence is stale (`stale`), and so is one made before dist_quant changed the model's quantizers."""

    def __init__(self, model: nn.Module, bridge: ModelBridge, groups: ParallelGroups, dst: int | None, quant_state: bool):
        registry = bridge.registry(quant_state=quant_state)
        self.slots = _slots(model, groups.rank("ep"), quant_state)
        self.signature = _signature(self.slots)
        self.structure = structure_version(model)
        mine = {
            "coords": {n: groups.rank(n) for n in ("tp", "dp", "ep", "etp", "edp")},
            "tensors": {name: held for name, held in self.signature.items() if held is not None},
        }
        inventory = every_rank(mine)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.device = model_device(model)
        layers: dict[str, list[Planned]] = {}
        for name in sorted({name for rank in inventory for name in rank["tensors"]}, key=_natural):
            mapping, _, hf_names = registry.megatron_to_hf(name)
            if not mapping.exported:
                continue
            sources = _holders(inventory, name, mapping.expert, mapping.shard_dim is not None)
            target = sources[0] if dst is None else dst
            if self.rank != target and self.rank not in sources:
                continue  # other ranks' business: this rank's stream never looks at it
            held = [inventory[r]["tensors"][name] for r in sources]
            planned = Planned(name, mapping, tuple(hf_names), tuple(sources), tuple(h[0] for h in held), held[0][1], target)
            layers.setdefault(layer_key(name), []).append(planned)
        self.layers = list(layers.items())

    def stale(self, model: nn.Module) -> bool:
        """Local: whether this rank's tensors or quantizers changed since planning."""
        return self.structure != structure_version(model) or _signature(self.slots) != self.signature

    def tensor(self, name: str) -> torch.Tensor:
        container, key = self.slots[name]
        return container[key].detach()


def _slots(model: nn.Module, ep_rank: int, quant_state: bool) -> dict[str, tuple[dict, str]]:
    """Logical name -> (the dict holding it, key) for every parameter and persistent buffer `state_dict` would
    give (buffers that are None too, so that one appearing later makes a plan stale); quantizer buffers only
    with quant_state."""
    logical_name = logical_namer(model, ep_rank)
    slots = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        persistent = [k for k in module._buffers if k not in module._non_persistent_buffers_set]
        for container, keys in ((module._parameters, list(module._parameters)), (module._buffers, persistent)):
            for key in keys:
                name = f"{prefix}.{key}" if prefix else key
                if quant_state or "_quantizer." not in name:
                    slots[logical_name(name)] = (container, key)
    return slots


def _signature(slots: dict[str, tuple[dict, str]]) -> dict[str, tuple[tuple[int, ...], torch.dtype] | None]:
    signature = {}
    for name, (container, key) in slots.items():
        tensor = container[key]
        signature[name] = None if tensor is None else (tuple(tensor.shape), tensor.dtype)
    return signature


def export_plan(model: nn.Module, bridge: ModelBridge, groups: ParallelGroups, dst: int | None, quant_state: bool) -> ExportPlan:
    """The model's plan for this stream, made or remade where any rank's is missing or stale. Collective."""
    key = (dst, quant_state, id(bridge), tuple(group_ranks(getattr(groups, n)) for n in GROUP_NAMES))
    plans = model.__dict__.setdefault("_dist_quant_export_plans", {})
    plan = plans.get(key)
    if any(every_rank(plan is None or plan.stale(model))):
        plan = plans[key] = ExportPlan(model, bridge, groups, dst, quant_state)
    return plan


def layer_key(name: str) -> str:
    """The unit a stream works in: `decoder.layers.N` for the tensors of a layer, else the module (embedding,
    final norm, output layer)."""
    match = _LAYER_PREFIX.match(name)
    return match.group(1) if match else name.rsplit(".", 1)[0]


_LAYER_PREFIX = re.compile(r"^(.*?\blayers\.\d+)\.")


def export_hf_layers(
    model: nn.Module, bridge: ModelBridge, groups: ParallelGroups, dst: int | None = 0, quant_state: bool = False
) -> Iterator[tuple[str, list[tuple[Planned, torch.Tensor, bool]]]]:
    """Per layer, in stream order, the full logical tensors this rank yields: (planned, tensor, owned), where
    owned False means the tensor is the model's own (a caller handing it out copies it first). Pieces are sent
    to the yielding rank by the ranks of model replica 0 that hold them: rank `dst`, or with `dst` None the
    first rank holding a piece of the tensor (the one holding the first piece of its module's weight too), so
    that every rank yields a share and nothing passes through one rank. Collective: every rank must exhaust
    the generator."""
    plan = export_plan(model, bridge, groups, dst, quant_state)
    me = plan.rank
    for key, entries in plan.layers:
        layer = []
        for planned in entries:
            if planned.sources == (me,) and planned.target == me:  # whole here: no copy, no message
                layer.append((planned, plan.tensor(planned.name), False))
                continue
            pieces = []
            for source, shape in zip(planned.sources, planned.shapes):
                if source == me == planned.target:
                    pieces.append(plan.tensor(planned.name))
                elif source == me:
                    dist.send(plan.tensor(planned.name).contiguous(), planned.target)
                elif me == planned.target:
                    buffer = torch.empty(shape, dtype=planned.dtype, device=plan.device)
                    dist.recv(buffer, source)
                    pieces.append(buffer)
            if me == planned.target:
                mapping = planned.mapping
                if len(pieces) == 1:  # unsharding one piece is the identity, strided or not
                    layer.append((planned, pieces[0], planned.sources[0] != me))
                else:
                    layer.append((planned, unshard(pieces, mapping.shard_dim, mapping.stride), True))
        if layer:
            yield key, layer


def owned(layer: list[tuple[Planned, torch.Tensor, bool]]) -> list[tuple[Planned, torch.Tensor]]:
    """The layer's tensors with those that are the model's own replaced by copies: one concatenation per dtype,
    not one copy per tensor."""
    out = [(planned, tensor) for planned, tensor, _ in layer]
    borrowed: dict[torch.dtype, list[int]] = {}
    for i, (_, tensor, is_owned) in enumerate(layer):
        if not is_owned:
            borrowed.setdefault(tensor.dtype, []).append(i)
    for indices in borrowed.values():
        tensors = [out[i][1] for i in indices]
        flat = torch.cat([t.reshape(-1) for t in tensors])
        for i, tensor, copy in zip(indices, tensors, flat.split([t.numel() for t in tensors])):
            out[i] = (out[i][0], copy.view(tensor.shape))
    return out


def export_hf_bundles(
    model: nn.Module, bridge: ModelBridge, groups: ParallelGroups, dst: int | None = 0, quant_state: bool = False
) -> Iterator[tuple[str, list[tuple[str, torch.Tensor]]]]:
    """Yield, on rank `dst`, (logical Megatron name, [(HF name, full tensor), ...]) one logical tensor at a time,
    in an order where each module's weight and quantizer buffers come together (see `export_hf_layers`). The
    tensors never alias the model. Collective: every rank must exhaust the generator."""
    for _, layer in export_hf_layers(model, bridge, groups, dst, quant_state):
        for planned, tensor in owned(layer):
            yield planned.name, list(zip(planned.hf_names, planned.mapping.to_hf(tensor)))


def export_hf_stream(
    model: nn.Module, bridge: ModelBridge, groups: ParallelGroups, dst: int | None = 0, quant_state: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) pairs on rank `dst`; see export_hf_bundles."""
    for _, tensors in export_hf_bundles(model, bridge, groups, dst, quant_state):
        yield from tensors


def _holders(inventory: list[dict], name: str, expert: bool, sharded: bool) -> list[int]:
    """Global ranks of model replica 0 holding pieces of `name`, in piece order (one if not sharded)."""
    replica, piece = ("edp", "etp") if expert else ("dp", "tp")
    owners = {
        rank["coords"][piece]: r
        for r, rank in enumerate(inventory)
        if name in rank["tensors"] and rank["coords"][replica] == 0
    }
    return [owners[k] for k in sorted(owners)] if sharded else [owners[min(owners)]]


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in name.split(".")]
