"""Writing a calibrated sharded model as a Hugging Face checkpoint in the ModelOpt unified format (SPEC.md
section 2), the format vLLM, SGLang and TensorRT-LLM load.

The bridge streams one logical Megatron tensor at a time, with its quantizer buffers, to one rank, which
quantizes it per Hugging Face module and writes size-bounded safetensors shards into a temporary directory; the
directory is verified and renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

import dist_quant
from dist_quant.bridge.io import SafetensorsReader, export_hf_bundles, has_safetensors
from dist_quant.bridge.models import ModelBridge
from dist_quant.export.output import OutputError, OutputTarget
from dist_quant.export.verify import VerificationError, kv_cache_scheme, verify
from dist_quant.modules import QuantModule
from dist_quant.modules.base import model_device
from dist_quant.numerics import fp8_quantize, fp8_scale, nvfp4_dequantize, nvfp4_fake_quant, nvfp4_quantize
from dist_quant.numerics.fp8 import divide, fp8_fake_quant
from dist_quant.numerics.nvfp4 import SCALE_2_DIVISOR
from dist_quant.parallel.agree import every_rank, first_error, with_rank
from dist_quant.parallel.groups import ParallelGroups, default_groups
from dist_quant.quantizer import FP8, NVFP4, QuantFormat, TensorQuantizer

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "vocab.json",
    "merges.txt", "generation_config.json", "chat_template.jinja",
)
_QUANTIZER = re.compile(r"^(.*)\.(weight|input|k_bmm|v_bmm)_quantizer\.(_amax|_global_amax|_block_amax)$")
_LOCAL_EXPERT = re.compile(r"\.local_experts\.\d+\.")


_NO_WEIGHTS = (
    "the recipe quantizes no linear weight: the checkpoint format describes quantized weights (for an FP8 KV cache "
    "alone, serve the unquantized model with the engine's FP8 KV cache)"
)


class ExportError(RuntimeError):
    """The model cannot be exported as asked (raised on every rank)."""


def _agree(error: str | None) -> None:
    """Raise the first rank's error on every rank, so none is left waiting in a collective."""
    first = first_error(error)
    if first:
        raise ExportError(with_rank(first))


def _formats(model: nn.Module) -> dict[str, QuantFormat]:
    """Quantizer formats by logical name, from every rank (pipeline stages hold other layers); experts by a name
    without their number (recipes treat them alike). Collective."""
    formats = {}
    for _, module in model.named_modules():
        if isinstance(module, QuantModule):
            for attr, q in module.named_children():
                if isinstance(q, TensorQuantizer) and q.enabled:
                    formats[_LOCAL_EXPERT.sub(".local_experts.*.", f"{module.layout.logical_name}.{attr}")] = q.fmt
    return {name: fmt for rank_formats in every_rank(formats) for name, fmt in rank_formats.items()}


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


def _group_by_module(bundles) -> Iterator[tuple[str, list[tuple[str, torch.Tensor]]]]:
    """Consecutive bundles of one Megatron module (its weight and quantizer buffers) as one group."""
    current, items = None, []
    for name, tensors in bundles:
        match = _QUANTIZER.match(name)
        module = match.group(1) if match else name.rsplit(".", 1)[0]
        if module != current and items:
            yield current, items
            items = []
        current = module
        items += tensors
    if items:
        yield current, items


class _ShardWriter:
    """Size-bounded safetensors shards of one rank, under temporary names (`prefix` tells ranks apart)."""

    def __init__(self, directory: Path, max_shard_bytes: int, prefix: str = ""):
        from safetensors.torch import save_file

        self.directory, self.max_bytes, self.save, self.prefix = directory, max_shard_bytes, save_file, prefix
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes, self.files, self.total = 0, [], 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.detach().contiguous().cpu()
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        file = f"shard-{self.prefix}{len(self.files):05d}.safetensors"
        self.save(self.pending, self.directory / file, metadata={"format": "pt"})
        (self.directory / file).chmod(0o644)  # safetensors writes 0600; a checkpoint is for others to read
        self.files.append((file, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> tuple[list[tuple[str, list[str]]], int]:
        """-> (every shard file with the tensors it holds, the bytes written)."""
        if self.pending:
            self._flush()
        return self.files, self.total


def _write_index(directory: Path, files: list[tuple[str, list[str]]], total: int) -> None:
    """Give the shards their final names, model-0000i-of-0000n in the order given, and write the index."""
    weight_map = {}
    for i, (file, names) in enumerate(files):
        final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        (directory / file).rename(directory / final)
        weight_map.update({name: final for name in names})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


class _ModuleQuantizer:
    """Turns one group of HF tensors (weights and quantizer buffers) into checkpoint tensors."""

    def __init__(self, formats: dict[str, QuantFormat], dtype_for: Callable[[str], torch.dtype]):
        self.formats = formats
        self.dtype_for = dtype_for  # HF name -> the dtype an unquantized tensor is written in
        self.quantized: dict[str, str] = {}  # HF module -> "NVFP4" | "FP8"
        self.excluded: list[str] = []
        self.kv_algos: set[str] = set()

    def gather(self) -> None:
        """What every rank's quantizer met, merged (collective): for the configs of a checkpoint many ranks wrote."""
        for quantized, excluded, kv_algos in every_rank((self.quantized, self.excluded, self.kv_algos)):
            self.quantized |= quantized
            self.excluded = sorted(set(self.excluded) | set(excluded))
            self.kv_algos |= kv_algos

    def __call__(self, megatron_module: str, items: list[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        buffers: dict[str, dict[str, torch.Tensor]] = {}
        weights = []
        for name, tensor in items:
            match = _QUANTIZER.match(name)
            if match:
                buffers.setdefault(f"{match.group(1)}.{match.group(2)}", {})[match.group(3)] = tensor
            else:
                weights.append((name, tensor))
        key = _LOCAL_EXPERT.sub(".local_experts.*.", megatron_module)
        for kind in ("k", "v"):
            amax = next((b["_amax"] for n, b in buffers.items() if n.endswith(f".{kind}_bmm")), None)
            fmt = self.formats.get(f"{key}.{kind}_bmm_quantizer")
            if fmt is not None and amax is not None:
                parent = next(n for n in buffers if n.endswith(f".{kind}_bmm"))[: -len(f".{kind}_bmm")]
                self.kv_algos.add("FP8" if fmt.kind == FP8 else "NVFP4")
                yield f"{parent}.{kind}_proj.{kind}_scale", fp8_scale(amax).reshape(())
        for name, weight in weights:
            yield from self._weight(name, weight, buffers, key)

    def _weight(self, name, weight, buffers, key):
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        fmt = self.formats.get(f"{key}.weight_quantizer") if module else None
        if fmt is None:
            if module and weight.dim() == 2 and not module.endswith("embed_tokens"):
                self.excluded.append(module)
            yield name, weight.to(self.dtype_for(name))
            return
        if fmt.axis is not None:
            raise ExportError(f"{module}: per-channel weight scales are not part of the checkpoint format")
        state = buffers.get(f"{module}.weight", {})
        amax = state.get("_global_amax", state.get("_amax"))
        if amax is None:
            warnings.warn(f"{module}: weight quantizer has no amax; taken from the weight (calibrate first)", stacklevel=2)
            amax = weight.float().abs().max()
        if fmt.kind == NVFP4:
            block = state.get("_block_amax") if fmt.block_type == "static" else None
            packed, block_scale, scale_2 = nvfp4_quantize(weight, amax, block)
            if not torch.equal(nvfp4_dequantize(packed, block_scale, scale_2, weight.dtype), nvfp4_fake_quant(weight, amax, block)):
                raise ExportError(f"{module}: the exported weight does not dequantize to the fake-quant weight")
            yield f"{module}.weight", packed
            yield f"{module}.weight_scale", block_scale
            yield f"{module}.weight_scale_2", scale_2.reshape(())
        else:
            q, scale = fp8_quantize(weight, amax)
            if not torch.equal((q.float() * scale).to(weight.dtype), fp8_fake_quant(weight, amax)):
                raise ExportError(f"{module}: the exported weight does not dequantize to the fake-quant weight")
            yield f"{module}.weight", q
            yield f"{module}.weight_scale", scale.reshape(())
        self.quantized[module] = "NVFP4" if fmt.kind == NVFP4 else "FP8"
        input_fmt = self.formats.get(f"{key}.input_quantizer")
        if input_fmt is not None:
            state = buffers.get(f"{module}.input", {})
            input_amax = state.get("_global_amax", state.get("_amax"))
            divisor = SCALE_2_DIVISOR if input_fmt.kind == NVFP4 else 448.0
            yield f"{module}.input_scale", divide(input_amax.float(), divisor).reshape(())


def source_dtypes(bridge: ModelBridge, source_dir: str | os.PathLike | None) -> Callable[[str], torch.dtype]:
    """HF name -> the dtype its tensor has in the source checkpoint; the config's dtype for tensors (or whole
    checkpoints) not found there."""
    reader = SafetensorsReader(source_dir) if source_dir is not None and has_safetensors(source_dir) else None
    stored = set(reader.names()) if reader is not None else set()
    return lambda name: reader.dtype(name) if name in stored else bridge.dtype


def checkpoint_tensors(
    model: nn.Module,
    bridge: ModelBridge,
    groups: ParallelGroups,
    dst: int | None = 0,
    quantizer: _ModuleQuantizer | None = None,
    source_dir: str | os.PathLike | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) as the checkpoint holds them, on rank `dst` (None: each module on the rank holding its
    first piece), one module at a time (collective). Unquantized tensors keep the dtype they have in
    `source_dir` (else the config's dtype)."""
    quantizer = quantizer or _ModuleQuantizer(_formats(model), source_dtypes(bridge, source_dir))
    for megatron_module, items in _group_by_module(export_hf_bundles(model, bridge, groups, dst, quant_state=True)):
        yield from quantizer(megatron_module, items)


def _quant_config(quantizer: _ModuleQuantizer) -> dict:
    algos = set(quantizer.quantized.values())
    if len(quantizer.kv_algos) > 1:
        raise ExportError(f"K and V caches in different formats: {sorted(quantizer.kv_algos)}")
    if not algos:
        raise ExportError(_NO_WEIGHTS)
    algo = algos.pop() if len(algos) == 1 else "MIXED_PRECISION"
    quantization = {
        "quant_algo": algo,
        "kv_cache_quant_algo": next(iter(quantizer.kv_algos), None),
        "group_size": 16,
        "exclude_modules": sorted(quantizer.excluded),
    }
    if algo == "MIXED_PRECISION":
        quantization["quantized_layers"] = {m: {"quant_algo": a} for m, a in sorted(quantizer.quantized.items())}
    return {"producer": {"name": "dist_quant", "version": dist_quant.__version__}, "quantization": quantization}


def estimated_bytes(model: nn.Module, bridge: ModelBridge, groups: ParallelGroups) -> int:
    """About how many bytes the checkpoint of this calibrated (or quantizer-attached) model takes: each parameter
    once (replicas skipped), quantized weights at their format's size, the rest at the checkpoint's dtype.
    Collective over the world."""
    sizes = {}
    for _, module in model.named_modules():
        if isinstance(module, QuantModule):
            for quantizer, weight in module.weight_quantizers():
                if quantizer.enabled:
                    sizes[id(weight)] = 0.5 + 1 / 16 if quantizer.fmt.kind == NVFP4 else 1.0  # packed + block scales
    local = 0.0
    for param in model.parameters():
        expert = not getattr(param, "allreduce", True)  # megatron marks expert-parallel parameters so
        if groups.rank("edp" if expert else "dp") == 0:
            local += param.numel() * sizes.get(id(param), bridge.dtype.itemsize)
    total = torch.tensor([local], dtype=torch.float64, device=model_device(model))
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    return int(total.item())


def _write_configs(directory: Path, bridge: ModelBridge, quantizer: _ModuleQuantizer, source_dir) -> None:
    hf_quant_config = _quant_config(quantizer)
    config = bridge.exported_config()
    q = hf_quant_config["quantization"]
    config["quantization_config"] = {
        "quant_method": "modelopt",
        "quant_algo": q["quant_algo"],
        "kv_cache_scheme": kv_cache_scheme(q["kv_cache_quant_algo"]),
        "ignore": q["exclude_modules"],
        **({"quantized_layers": q["quantized_layers"]} if "quantized_layers" in q else {}),
    }
    (directory / "hf_quant_config.json").write_text(json.dumps(hf_quant_config, indent=2))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    for file in TOKENIZER_FILES:
        if source_dir is not None and (Path(source_dir) / file).is_file():
            shutil.copy2(Path(source_dir) / file, directory / file)


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
    formats = _formats(model)
    if not any(name.endswith(".weight_quantizer") for name in formats):
        problem = problem or _NO_WEIGHTS
    try:
        _agree(problem or _check_activations(model))
        parallel = writers == "all" and dist.is_initialized() and dist.get_world_size() > 1
        partial = [target.partial]
        if parallel:  # every rank writes into the directory dst claimed
            dist.broadcast_object_list(partial, src=dst)
        writer = _ShardWriter(partial[0], max_shard_bytes, f"r{me:05d}-") if parallel or me == dst else None
        quantizer = _ModuleQuantizer(formats, source_dtypes(bridge, source_dir))
        for name, tensor in checkpoint_tensors(model, bridge, groups, None if parallel else dst, quantizer):
            writer.add(name, tensor)
            if on_tensor is not None:
                on_tensor(name)
        files = [writer.close()] if writer is not None else []
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
