"""Writing a calibrated sharded model as a Hugging Face checkpoint in the ModelOpt unified format
(docs/checkpoint.md), the format vLLM, SGLang and TensorRT-LLM load.

The bridge streams one logical Megatron tensor at a time, with its quantizer buffers, to one rank, which
quantizes it per Hugging Face module and writes size-bounded safetensors shards into a temporary directory; the
directory is verified and renamed into place only when complete.
"""

from __future__ import annotations

import functools
import json
import os
import re
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

import dist_quant
from dist_quant.bridge.io import Planned, export_hf_layers, has_safetensors, owned, source_reader
from dist_quant.bridge.models import ModelBridge
from dist_quant.export.buckets import bucketed
from dist_quant.export.shards import ShardWriter
from dist_quant.export.side_files import copy_side_files
from dist_quant.export.output import OutputError, OutputTarget
from dist_quant.export.configs import LAYER_ALGOS, MIXED, checkpoint_configs
from dist_quant.export.problems import (
    NO_WEIGHTS, ExportError, block_layout_problem, blocks, quantizer_problem, scale_inv_problem,
)
from dist_quant.export.verify import VerificationError, verify
from dist_quant.modules import QuantModule
from dist_quant.modules.base import model_device
from dist_quant.numerics.fp8 import divide, fp8_scale
from dist_quant.parallel.agree import every_rank, first_error, with_rank
from dist_quant.parallel.groups import ParallelGroups, default_groups
from dist_quant.formats import FORMATS, STATIC, QuantFormat
from dist_quant.quantizer import TensorQuantizer

_QUANTIZER = re.compile(r"^(.*)\.(weight|input|k_bmm|v_bmm)_quantizer\.(_amax|_global_amax|_block_amax)$")
_LOCAL_EXPERT = re.compile(r"\.local_experts\.\d+\.")


TRANSFER_BYTES = 256 << 20  # the checkpoint's tensors reach the host in transfers of about this size

def _agree(error: str | None) -> None:
    """Raise the first rank's error on every rank, so none is left waiting in a collective."""
    first = first_error(error)
    if first:
        raise ExportError(with_rank(first))


def _quantizers(model: nn.Module) -> dict[str, dict[str, QuantFormat | None]]:
    """Every quantized module's quantizer formats (None: disabled) by its logical name, from every rank (pipeline
    stages hold other layers); experts by a name without their number (recipes treat them alike). Collective."""
    modules: dict[str, dict[str, QuantFormat | None]] = {}
    for _, module in model.named_modules():
        if isinstance(module, QuantModule):
            formats = modules.setdefault(_LOCAL_EXPERT.sub(".local_experts.*.", module.layout.logical_name), {})
            formats.update((attr, q.fmt) for attr, q in module.named_children() if isinstance(q, TensorQuantizer))
    return {name: formats for rank_modules in every_rank(modules) for name, formats in rank_modules.items()}


def _formats(modules: dict[str, dict[str, QuantFormat | None]]) -> dict[str, QuantFormat]:
    """The enabled quantizers' formats by their logical names."""
    return {f"{module}.{q}": fmt for module, formats in modules.items() for q, fmt in formats.items() if fmt is not None}


def _check_activations(model: nn.Module) -> str | None:
    activations = [
        (name, q) for name, q in model.named_modules()
        if isinstance(q, TensorQuantizer) and q.enabled and not name.endswith("weight_quantizer")
    ]
    missing = next((name for name, q in activations if q._amax is None), None)
    if missing is None and activations:
        seen = (torch.stack([q._amax.reshape(()) for _, q in activations]) > 0).tolist()  # one device sync
        missing = next((name for (name, _), ok in zip(activations, seen) if not ok), None)
    return None if missing is None else f"{missing} has no calibrated amax (it saw no data): calibrate before exporting"


def _write_index(directory: Path, files: list[tuple[str, list[str]]], total: int) -> None:
    """Give the shards their final names, model-0000i-of-0000n in the order given, and write the index."""
    weight_map = {}
    for i, (file, names) in enumerate(files):
        final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        (directory / file).rename(directory / final)
        weight_map.update({name: final for name in names})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


@functools.cache  # ~75,000 names per stream of a 30B MoE, the same at every refit
def _parse(name: str) -> tuple[str, str | None, str | None, str]:
    """A logical Megatron name -> (its module, the quantizer role or None, the quantizer buffer or None, the key
    its format is recorded under: experts by a name without their number)."""
    match = _QUANTIZER.match(name)
    module = match.group(1) if match else name.rsplit(".", 1)[0]
    role, buffer = (match.group(2), match.group(3)) if match else (None, None)
    return module, role, buffer, _LOCAL_EXPERT.sub(".local_experts.*.", module)


# Elements of weights one group quantizes in a launch: quantizing and checking a group holds ~5 bytes of
# transients per weight byte (the concatenated rows, their fake quantization and dequantization, the comparison),
# so one DeepSeek-V3 MoE layer's 256 experts (7.5B elements of linear_fc1) in one group would add 60 GB to the
# peak; groups of 2^28 elements keep that near 3 GB and a 30B MoE layer in a launch or two.
GROUP_ELEMENTS = 1 << 28


class _Group:
    """Weights of one format, dtype and width, quantized in one launch as row segments of one tensor."""

    def __init__(self):
        self.weights: list[torch.Tensor] = []
        self.amax: list[torch.Tensor] = []
        self.block_amax: list[torch.Tensor] = []
        self.elements = 0

    def full(self, weight: torch.Tensor) -> bool:
        return bool(self.weights) and self.elements + weight.numel() > GROUP_ELEMENTS

    def add(self, weight: torch.Tensor, amax: torch.Tensor, block_amax: torch.Tensor | None) -> int:
        self.elements += weight.numel()
        self.weights.append(weight)
        self.amax.append(amax.reshape(()))
        if block_amax is not None:
            self.block_amax.append(block_amax.reshape(weight.shape[0], -1))
        return len(self.weights) - 1


class _LayerQuantizer:
    """Turns a layer's tensors (weights and quantizer buffers, from `export_hf_layers`) into checkpoint tensors.
    The layer's quantized weights of one format, dtype and width are quantized together, in one kernel launch
    per GROUP_ELEMENTS (an MoE layer's experts and fused siblings alike); results stay on the device and are checked in bulk, with
    one host sync per layer."""

    def __init__(self, bridge: ModelBridge, formats: dict[str, QuantFormat], dtype_for: Callable[[str], torch.dtype]):
        self.kv_scale_of = bridge.kv_scale_of
        self.formats = formats
        self.dtype_for = dtype_for  # HF name -> the dtype an unquantized tensor is written in
        # HF module -> its quant_algo (configs.LAYER_ALGOS; None for the pairs without a checkpoint form, which a
        # refit streams and export_hf refuses before writing)
        self.quantized: dict[str, str | None] = {}
        self.excluded: list[str] = []
        self.kv_algos: set[str] = set()

    def gather(self) -> None:
        """What every rank's quantizer met, merged (collective): for the configs of a checkpoint many ranks wrote."""
        for quantized, excluded, kv_algos in every_rank((self.quantized, self.excluded, self.kv_algos)):
            self.quantized |= quantized
            self.excluded = sorted(set(self.excluded) | set(excluded))
            self.kv_algos |= kv_algos

    def __call__(self, layer: list[tuple[Planned, torch.Tensor, bool]]) -> list[tuple[str, torch.Tensor]]:
        buffers: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        for planned, tensor, _ in layer:
            module, role, buffer, _ = _parse(planned.name)
            if role is not None:
                buffers.setdefault((module, role), {})[buffer] = tensor
        groups: dict[tuple, _Group] = {}  # (format, static, dtype, width, chunk) -> its weights
        chunks: dict[tuple, int] = {}  # (format, static, dtype, width) -> its last group's chunk
        plain, placed = [], {}  # unquantized tensors; quantized weight -> (its group key, index)
        for i, (planned, tensor, is_owned) in enumerate(layer):
            module, role, _, key = _parse(planned.name)
            fmt = self.formats.get(f"{key}.weight_quantizer") if planned.name.endswith(".weight") else None
            if role is not None:
                continue
            if fmt is None:
                plain.append((planned, tensor, is_owned))
                continue
            if fmt.axis is not None:
                raise ExportError(f"{planned.hf_names[0][: -len('.weight')]}: per-channel weight scales are not part of the checkpoint format")
            if fmt.number.blocks_span_rows:
                _check_rank_blocks(planned, fmt)
            state = buffers.get((module, "weight"), {})
            amax = state.get("_global_amax", state.get("_amax"))
            if amax is None:
                warnings.warn(f"{module}: weight quantizer has no amax; taken from the weight (calibrate first)", stacklevel=2)
                amax = tensor.float().abs().max()
            static = fmt.block_type == STATIC
            kind = (fmt.kind, static, tensor.dtype, tensor.shape[-1])
            chunk = chunks.setdefault(kind, 0)
            if groups.get((*kind, chunk), _Group()).full(tensor):  # next group of the kind
                chunk = chunks[kind] = chunk + 1
            group_key = (*kind, chunk)
            placed[i] = group_key, groups.setdefault(group_key, _Group()).add(tensor, amax, state.get("_block_amax") if static else None)
        checks: list[tuple[str, torch.Tensor]] = []
        results = {key: self._quantize(key, group, checks) for key, group in groups.items()}
        unquantized = dict(zip((p.name for p, _, _ in plain), (t for _, t in owned(plain))))
        input_scales = self._input_scales(layer, placed, buffers)
        out = []
        for i, (planned, tensor, _) in enumerate(layer):
            module, role, buffer, key = _parse(planned.name)
            if role in ("k_bmm", "v_bmm") and buffer == "_amax" and f"{key}.{role}_quantizer" in self.formats:
                fmt = self.formats[f"{key}.{role}_quantizer"]
                self.kv_algos.add(fmt.number.algo)
                out.append((self.kv_scale_of(planned.hf_names[0]), fp8_scale(tensor).reshape(())))
            elif i in placed:
                out += self._emit(planned, results[placed[i][0]], placed[i], input_scales.get(i), checks)
            elif planned.name in unquantized:
                for hf_name, piece in zip(planned.hf_names, planned.mapping.to_hf(unquantized[planned.name])):
                    if piece.dim() == 2 and hf_name.endswith(".weight") and not hf_name.endswith("embed_tokens.weight"):
                        self.excluded.append(hf_name[: -len(".weight")])
                    out.append((hf_name, piece.to(self.dtype_for(hf_name))))
        if checks:  # one host sync for the layer
            failed = [what for (what, _), bad in zip(checks, torch.stack([bad for _, bad in checks]).tolist()) if bad]
            if failed:
                raise ExportError(failed[0])
        return out

    def _quantize(self, key: tuple, group: _Group, checks: list) -> tuple:
        """One group's weights, quantized by their format in one launch: (per-weight values, per-weight block
        scales or None, per-weight per-tensor scales as 0-d views); the format's checks join `checks`."""
        number, static = FORMATS[key[0]], key[1]
        rows = [w.shape[0] for w in group.weights]
        x = torch.cat(group.weights) if len(group.weights) > 1 else group.weights[0]
        block_amax = torch.cat(group.block_amax) if static else None
        result, failed = number.quantize_weights(x, torch.stack(group.amax), rows, block_amax)
        checks += [(f"{what}: {_which(group)}", bad) for what, bad in failed]
        return result

    def _input_scales(self, layer, placed, buffers) -> dict[int, torch.Tensor]:
        """Each quantized weight's input_scale (input amax / 2688 for NVFP4, / 448 for FP8), all in one division
        per divisor."""
        by_divisor: dict[float, list[tuple[int, torch.Tensor]]] = {}
        for i in placed:
            module, _, _, key = _parse(layer[i][0].name)
            fmt = self.formats.get(f"{key}.input_quantizer")
            if fmt is not None and fmt.number.static_inputs:
                state = buffers.get((module, "input"), {})
                amax = state.get("_global_amax", state.get("_amax"))
                by_divisor.setdefault(fmt.number.scale_divisor, []).append((i, amax.reshape(())))
        scales = {}
        for divisor, entries in by_divisor.items():
            values = divide(torch.stack([a for _, a in entries]).float(), divisor).unbind(0)
            scales.update(zip((i for i, _ in entries), values))
        return scales

    def _emit(self, planned: Planned, result: tuple, place: tuple, input_scale: torch.Tensor | None, checks: list) -> list:
        (kind, *_), index = place
        values, blocks, scales = result
        inputs = self.formats.get(f"{_parse(planned.name)[3]}.input_quantizer")
        algo = LAYER_ALGOS.get((kind, inputs.kind if inputs else None))
        pieces = planned.mapping.to_hf(values[index])
        block_pieces = [None] * len(pieces)
        if blocks is not None:
            try:
                block_pieces, straddles = FORMATS[kind].split_blocks(planned.mapping.to_hf, blocks[index], values[index].shape[0])
            except ValueError as error:
                raise ExportError(f"{', '.join(planned.hf_names)}: {error}, which the engines' blocks need") from None
            if straddles is not None:
                checks.append((f"{', '.join(planned.hf_names)}: a block of the fake-quantized {planned.name} straddles two "
                               "of its modules, whose own blocks the engines dequantize differently", straddles))
        out = []
        for hf_name, piece, block_piece in zip(planned.hf_names, pieces, block_pieces):
            module = hf_name[: -len(".weight")]
            out += FORMATS[kind].weight_checkpoint(module, piece, block_piece, scales[index])
            if input_scale is not None:
                out.append((f"{module}.input_scale", input_scale))
            self.quantized[module] = algo
        return out


def _check_rank_blocks(planned: Planned, fmt: QuantFormat) -> None:
    """A rank holding interleaved pieces of a fused weight (gate_r and up_r of linear_fc1: `stride`) fake-quantized
    its piece in blocks that must be blocks of each module as well."""
    rows, stride = fmt.number.multiple(fmt)[0], planned.mapping.stride
    split = next((shape[0] // stride for shape in planned.shapes if (shape[0] // stride) % rows), None) if stride > 1 else None
    if split is not None:
        raise ExportError(
            f"{', '.join(planned.hf_names)}: each tensor-parallel rank holds {split} rows of each, which is no whole "
            f"number of the {rows}-row blocks its fake quantization used; calibrate at a tensor-parallel size that "
            f"splits them into multiples of {rows} rows"
        )


def _which(group: _Group) -> str:
    return f"{len(group.weights)} weights of shape {tuple(group.weights[0].shape)} and alike"


def source_dtypes(bridge: ModelBridge, source_dir: str | os.PathLike | None) -> Callable[[str], torch.dtype]:
    """HF name -> the dtype its tensor has in the source checkpoint (an FP8 block-scaled one's FP8 weights: the
    dtype they are dequantized to); the config's dtype for tensors (or whole checkpoints) not found there."""
    reader = source_reader(source_dir, bridge) if source_dir is not None and has_safetensors(source_dir) else None
    stored = set(reader.names()) if reader is not None else set()
    return lambda name: reader.dtype(name) if name in stored else bridge.dtype


def checkpoint_layers(
    model: nn.Module,
    bridge: ModelBridge,
    groups: ParallelGroups,
    dst: int | None = 0,
    quantizer: _LayerQuantizer | None = None,
    source_dir: str | os.PathLike | None = None,
) -> Iterator[tuple[str, list[tuple[str, torch.Tensor]]]]:
    """(layer, [(name, tensor), ...]) with the tensors as the checkpoint holds them, on rank `dst` (None: each
    module on the rank holding its first piece), one layer at a time (collective). Unquantized tensors keep the
    dtype they have in `source_dir` (else the config's dtype)."""
    quantizer = quantizer or _LayerQuantizer(bridge, _formats(_quantizers(model)), source_dtypes(bridge, source_dir))
    for key, layer in export_hf_layers(model, bridge, groups, dst, quant_state=True):
        yield key, quantizer(layer)


def checkpoint_tensors(
    model: nn.Module,
    bridge: ModelBridge,
    groups: ParallelGroups,
    dst: int | None = 0,
    quantizer: _LayerQuantizer | None = None,
    source_dir: str | os.PathLike | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """`checkpoint_layers`, one tensor at a time."""
    for _, tensors in checkpoint_layers(model, bridge, groups, dst, quantizer, source_dir):
        yield from tensors


def _quant_configs(quantizer: _LayerQuantizer, tied: bool) -> tuple[dict | None, dict]:
    """(hf_quant_config.json or None, config.json's quantization_config): `configs.checkpoint_configs`. A head tied
    to the embedding holds no tensor of its own, is never quantized, and is listed as excluded all the same: vLLM
    otherwise builds a quantized head whose scales never load."""
    algos = set(quantizer.quantized.values())
    if len(quantizer.kv_algos) > 1:
        raise ExportError(f"K and V caches in different formats: {sorted(quantizer.kv_algos)}")
    if not algos:
        raise ExportError(NO_WEIGHTS)
    algo = algos.pop() if len(algos) == 1 else MIXED
    excluded = set(quantizer.excluded) | ({"lm_head"} if tied else set())
    producer = {"name": "dist_quant", "version": dist_quant.__version__}
    return checkpoint_configs(producer, algo, next(iter(quantizer.kv_algos), None), sorted(excluded), quantizer.quantized)


def estimated_bytes(model: nn.Module, bridge: ModelBridge, groups: ParallelGroups) -> int:
    """About how many bytes the checkpoint of this calibrated (or quantizer-attached) model takes: each parameter
    once (replicas skipped), quantized weights at their format's size, the rest at the checkpoint's dtype.
    Collective over the world."""
    sizes = {}
    for _, module in model.named_modules():
        if isinstance(module, QuantModule):
            for quantizer, weight in module.weight_quantizers():
                if quantizer.enabled:
                    sizes[id(weight)] = quantizer.fmt.number.weight_bytes
    local = 0.0
    for param in model.parameters():
        expert = not getattr(param, "allreduce", True)  # megatron marks expert-parallel parameters so
        if groups.rank("edp" if expert else "dp") == 0:
            local += param.numel() * sizes.get(id(param), bridge.dtype.itemsize)
    total = torch.tensor([local], dtype=torch.float64, device=model_device(model))
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    return int(total.item())


def _write_configs(directory: Path, bridge: ModelBridge, quantizer: _LayerQuantizer, source_dir) -> None:
    hf_quant, quantization = _quant_configs(quantizer, bridge.tied)
    # the source's quantization_config (an FP8 block-scaled source's) left out: the export's own goes last, as for
    # an unquantized source
    config = {key: value for key, value in bridge.exported_config().items() if key != "quantization_config"}
    config["quantization_config"] = quantization
    if hf_quant is not None:  # none in the native form
        (directory / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=2))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    if source_dir is not None:
        copy_side_files(source_dir, directory)


def export_hf(
    model: nn.Module,
    bridge: ModelBridge,
    out_dir: str | os.PathLike | OutputTarget,
    groups: ParallelGroups | None = None,
    *,
    source_dir: str | os.PathLike | None = None,
    max_shard_bytes: int = 4 << 30,
    overwrite: bool = False,
    dst: int = 0,
    on_tensor: Callable[[str], None] | None = None,
    writers: str = "one",
) -> Path | None:
    """Write the calibrated model as a quantized HF checkpoint on rank `dst` (collective: every rank calls).
    `out_dir`: a new directory or a dist_quant checkpoint to replace (`overwrite`), or an OutputTarget the caller
    has claimed already. `source_dir`: the HF checkpoint it came from, for tokenizer files and the dtypes of
    unquantized tensors; the output may neither be it nor hold it. `on_tensor(name)` is called for every tensor
    written (progress). `writers`: "one" gathers every tensor to `dst`, which writes them; "all": each rank
    quantizes and writes the tensors whose first piece it holds, into the same directory (a file system every
    rank sees), and `dst` writes the index and configs. The tensors are the same either way. The directory
    appears only complete and verified. -> the directory on `dst`, else None."""
    if writers not in ("one", "all"):
        raise ValueError(f"writers must be 'one' or 'all', got {writers!r}")
    groups = groups or default_groups()
    me = dist.get_rank() if dist.is_initialized() else 0
    owned = not isinstance(out_dir, OutputTarget)  # the caller's target is claimed on dst already
    target = OutputTarget(out_dir, overwrite, [source_dir]) if owned else out_dir
    problem = None
    if owned:
        needed = estimated_bytes(model, bridge, groups)
        if me == dst:
            try:
                target.claim(needed)
            except OutputError as error:
                problem = str(error)
    modules = _quantizers(model)
    problem = (problem or quantizer_problem(modules, bridge.forward.latent is not None)
               or scale_inv_problem(bridge, modules) or block_layout_problem(bridge, blocks(modules)))
    formats = _formats(modules)
    try:
        _agree(problem or _check_activations(model))
        parallel = writers == "all" and dist.is_initialized() and dist.get_world_size() > 1
        partial = [target.partial]
        if parallel:  # every rank writes into the directory dst claimed
            dist.broadcast_object_list(partial, src=dst)
        writer = ShardWriter(partial[0], max_shard_bytes, f"r{me:05d}-") if parallel or me == dst else None
        quantizer = _LayerQuantizer(bridge, formats, source_dtypes(bridge, source_dir))
        tensors = checkpoint_tensors(model, bridge, groups, None if parallel else dst, quantizer)
        try:
            for bucket in bucketed(tensors, TRANSFER_BYTES):
                for name in writer.add(bucket):
                    if on_tensor is not None:
                        on_tensor(name)
        except BaseException:
            if writer is not None:  # no write goes on behind the caller's back
                writer.abandon()
            raise
        try:
            files, problem = [writer.close()] if writer is not None else [], None
        except ExportError as error:  # a write failed (a full disk): every rank stops with it
            problem = str(error)
        _agree(problem)
        if parallel:  # every rank's shards, in rank order
            files = every_rank(files[0])
            quantizer.gather()
        problem, out = None, None
        if me == dst:
            try:
                _write_index(target.partial, [f for shards, _ in files for f in shards], sum(t for _, t in files))
                _write_configs(target.partial, bridge, quantizer, source_dir)
                verify(target.partial)
                out = target.commit()
            except (VerificationError, ExportError, OSError) as error:
                problem = str(error)
        _agree(problem)
        return out
    finally:
        if owned and me == dst:
            target.release()
