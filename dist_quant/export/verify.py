"""Checking an exported checkpoint against the model its own config.json describes (docs/checkpoint.md), and
reading it back.

config.json, through the bridge, gives every tensor of the unquantized checkpoint with its shape;
hf_quant_config.json says which linear modules are quantized, and how. Together they give the complete set of
tensors the checkpoint must hold, with shapes and dtypes, and every stored tensor is held against it: first
from the safetensors headers alone, then, for the tensors whose header is right, the values the numeric checks
need.
"""

from __future__ import annotations

import functools
import json
import math
import re
import struct
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dist_quant.bridge.config import DTYPES
from dist_quant.bridge.io import INDEX_FILE, SAFETENSORS_DTYPES, SINGLE_FILE
from dist_quant.export.configs import (
    FP8_PB, GROUP_SIZE, KV_ALGOS, LAYER_ALGOS, MIXED, MODELOPT_ALGOS, NATIVE, QUANT_ALGOS, W4A16, input_quantized,
    layer_entry, native_quantization_config, quantization_config, required_quantization_keys, weight_format,
)
from dist_quant.formats import FORMATS, SCALAR, Spec
from dist_quant.recipe.schema import FUSED_SIBLINGS

FLOATS = tuple(DTYPES.values())  # the unquantized dtypes: those the bridge reads
SIBLINGS = tuple(names for _, names in FUSED_SIBLINGS)  # by their checkpoint names: the last part of a module's
_GROUPS = re.compile(r"^((model\.layers\.\d+)\.mlp\.experts\.\d+)\.|^(model\.layers\.\d+)\.")
_KV_SCALE = re.compile(r"\.self_attn\.(k_proj\.k|v_proj\.v|attn\.[kv])_scale$")
ACTIVATION_SCALES = (".input_scale", ".k_scale", ".v_scale")
# the weights whose outputs hold an attention's keys and values (bridge.mappings.kv_bmm_mappings) -> the K/V cache
# scales they stand for: k_proj and v_proj, or multi-latent attention's kv_b_proj
_KV_SOURCES = {".self_attn.k_proj.weight": "k", ".self_attn.v_proj.weight": "v", ".self_attn.kv_b_proj.weight": "kv"}


class VerificationError(ValueError):
    """A checkpoint breaks the format; the message lists every problem found."""


@dataclass
class Plan:
    """hf_quant_config.json's quantization section (or, in the native FP8 block form, config.json's
    quantization_config), once it is known to be usable."""

    algo: str
    kv: str | None
    exclude: list[str]
    layers: dict[str, str] | None  # MIXED_PRECISION: module -> its format
    native: bool = False  # the native fp8 form: `exclude` (modules_to_not_convert) holds exact names, not patterns

    def format_of(self, module: str) -> str | None:
        if self.layers is not None:
            return self.layers.get(module)
        if self.native:  # as vLLM matches modules_to_not_convert (Fp8Config: ignored_layers_match_mode "exact")
            return None if module in self.exclude else self.algo
        return None if any(fnmatchcase(module, p) for p in self.exclude) else self.algo

    def why(self, module: str) -> str:
        """Why the module must be in the format `format_of` gives."""
        if self.layers is not None:
            listed = self.layers.get(module)
            return f"quantized_layers says {listed}" if listed else "quantized_layers does not list it"
        listing = "modules_to_not_convert" if self.native else "exclude_modules"
        if self.format_of(module) is None:
            return f"{listing} excludes it"
        if self.native:
            return f"{listing} does not name it, so it must be {self.algo}"
        return f"no {listing} pattern matches it, so it must be {self.algo}"


# -- reading ---------------------------------------------------------------------------------------------
def _fail(directory: Path, problems: list[str]) -> None:
    if len(problems) == 1:
        raise VerificationError(f"{directory}: {problems[0]}")
    shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
    raise VerificationError(f"{directory}: {len(problems)} problems:\n  " + "\n  ".join(shown))


def _read_json(path: Path, problems: list[str]) -> dict | None:
    if not path.is_file():
        return problems.append(f"{path.name} is missing")
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as error:  # ValueError: undecodable bytes or invalid JSON
        return problems.append(f"{path.name} is not readable JSON ({error})")
    if not isinstance(value, dict):
        kind = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value), "null")
        return problems.append(f"{path.name} holds a JSON {kind}, not an object")
    return value


def _inside(file: str) -> bool:
    """Whether an index entry names a file in the checkpoint directory, from its text alone: an index must not
    make the verifier read elsewhere. Links the directory holds are followed (the Hugging Face cache links every
    file of a snapshot to a blob outside it)."""
    path = Path(file)
    return bool(file) and not path.is_absolute() and ".." not in path.parts


def _weight_map(directory: Path, problems: list[str]) -> tuple[dict[str, str] | None, set[str], bool]:
    """(tensor name -> file as the index has it, None without an index; the names lost to refused files;
    whether the index could be read at all)."""
    if not (directory / INDEX_FILE).exists():
        return None, set(), True
    index = _read_json(directory / INDEX_FILE, problems)
    weight_map = index.get("weight_map") if index is not None else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        if index is not None:
            problems.append(f"{INDEX_FILE}: weight_map must be an object of tensor name -> file name")
        return {}, set(), False
    outside = {f for f in set(weight_map.values()) if not _inside(f)}
    problems += [f"{INDEX_FILE} names {f!r}, outside the checkpoint directory: refused" for f in sorted(outside)]
    kept = {n: f for n, f in weight_map.items() if f not in outside}
    return kept, set(weight_map) - set(kept), True


@dataclass(frozen=True)
class Stored:
    file: str
    dtype: torch.dtype | str  # the safetensors name where torch has no such dtype
    shape: tuple[int, ...]


class Storage:
    """The checkpoint's safetensors files: every header read at once, tensor data only when asked for."""

    def __init__(self, directory: Path, problems: list[str], stack: ExitStack):
        from safetensors import SafetensorError, safe_open

        # complete: every stored tensor's name is known, so a tensor not found is missing, not unreadable
        weight_map, self.lost, self.complete = _weight_map(directory, problems)
        self.tensors: dict[str, Stored] = {}
        files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_FILE]
        if weight_map is None and not (directory / SINGLE_FILE).is_file():
            problems.append(f"no {SINGLE_FILE} or {INDEX_FILE}")
            files, self.complete = [], False
        stray = {p.name for p in directory.glob("*.safetensors")} - set(files) if self.complete else set()
        why = f"{INDEX_FILE} does not name it" if weight_map is not None else f"there is no {INDEX_FILE}"
        problems += [f"{f} is not part of the checkpoint ({why})" for f in sorted(stray)]
        for file in files:
            owned = {n for n, f in (weight_map or {}).items() if f == file}
            if not (directory / file).is_file():
                problems.append(f"{INDEX_FILE} names {file}, which does not exist ({len(owned)} tensors)")
                self.lost |= owned
                continue
            try:
                handle = stack.enter_context(safe_open(directory / file, "pt"))
                header = {n: handle.get_slice(n) for n in handle.keys()}
                header = {n: (piece.get_dtype(), tuple(piece.get_shape())) for n, piece in header.items()}
            except (SafetensorError, OSError) as error:
                problems.append(f"{file} is not a readable safetensors file ({error})")
                self.lost |= owned
                self.complete = self.complete and weight_map is not None
                continue
            absent = sorted(owned - set(header))
            problems += [f"{INDEX_FILE} maps {n} to {file}, which does not hold it" for n in absent]
            for name, (dtype, shape) in header.items():
                if weight_map is not None and weight_map.get(name) != file:
                    where = f"maps it to {weight_map[name]}" if name in weight_map else "does not list it"
                    problems.append(f"{name} is stored in {file}, but {INDEX_FILE} {where}")
                if name not in self.tensors or weight_map is not None and weight_map.get(name) == file:
                    self.tensors[name] = Stored(file, SAFETENSORS_DTYPES.get(dtype, dtype), shape)

        self._directory, self._data = directory, {}

    def raw(self, name: str) -> np.ndarray:
        """A tensor's bytes, mapped from its file (no copy, no per-tensor call into safetensors)."""
        file = self.tensors[name].file
        if file not in self._data:  # the file parsed as safetensors already: its header is sound
            path = self._directory / file
            with open(path, "rb") as f:
                length = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(length))
            data = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size > 8 + length else np.zeros(0, np.uint8)
            self._data[file] = (data, 8 + length, header)
        data, start, header = self._data[file]
        begin, end = header[name]["data_offsets"]
        return data[start + begin : start + end]


def load_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's files (those its index names, or model.safetensors)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    problems: list[str] = []
    weight_map, _, _ = _weight_map(directory, problems)
    if problems:
        _fail(directory, problems)
    tensors = {}
    for file in sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_FILE]:
        tensors.update(load_file(directory / file))
    return tensors


# -- the quantization configs ----------------------------------------------------------------------------
def _plan(quant: dict, problems: list[str]) -> Plan | None:
    """The quantization section, or None where it is too broken to say what the tensors must be."""
    producer = quant.get("producer")
    if not isinstance(producer, dict) or not {"name", "version"} <= set(producer):
        problems.append("hf_quant_config.json: producer needs name and version")
    section = quant.get("quantization")
    if not isinstance(section, dict):
        return problems.append("hf_quant_config.json: quantization is missing or not an object")
    algo, kv, exclude = (section.get(k) for k in ("quant_algo", "kv_cache_quant_algo", "exclude_modules"))
    required = required_quantization_keys(algo) if algo in (*MODELOPT_ALGOS, MIXED) else ("quant_algo", "kv_cache_quant_algo")
    problems += [f"hf_quant_config.json: quantization.{k} is missing" for k in required if k not in section and k != "quantized_layers"]
    usable = {"quant_algo", "kv_cache_quant_algo"} <= set(section) and (algo == MIXED or "exclude_modules" in section)
    if "quant_algo" in section and algo not in (*MODELOPT_ALGOS, MIXED):
        problems.append(f"hf_quant_config.json: quantization.quant_algo is {algo!r}, expected {', '.join(MODELOPT_ALGOS)} or {MIXED}")
        usable = False
    if kv not in (None, *KV_ALGOS):
        problems.append(f"hf_quant_config.json: quantization.kv_cache_quant_algo is {kv!r}, expected FP8, NVFP4, null")
        usable = False
    group_size = weight_format(algo).config_entries.get("group_size") if algo in QUANT_ALGOS else GROUP_SIZE
    if "group_size" in section and section["group_size"] != group_size:
        problems.append(f"hf_quant_config.json: quantization.group_size is {section['group_size']!r}, expected {group_size}")
    if "exclude_modules" in section and not (isinstance(exclude, list) and all(isinstance(p, str) for p in exclude)):
        problems.append("hf_quant_config.json: quantization.exclude_modules must be a list of module patterns")
        usable = False
    layers = None
    if algo == MIXED:
        entries = section.get("quantized_layers")
        if not isinstance(entries, dict):
            return problems.append(f"hf_quant_config.json: quantization.quantized_layers is missing ({MIXED} needs it)")
        layers = {m: e.get("quant_algo") if isinstance(e, dict) else None for m, e in entries.items()}
        bad = sorted(m for m, a in layers.items() if a not in QUANT_ALGOS)
        problems += [f"hf_quant_config.json: quantized_layers.{m} needs a quant_algo of {' or '.join(QUANT_ALGOS)}" for m in bad]
        problems += [
            f"hf_quant_config.json: quantized_layers.{m} is {json.dumps(entries[m])}, expected {json.dumps(layer_entry(a))}"
            for m, a in sorted(layers.items()) if a in QUANT_ALGOS and entries[m] != layer_entry(a)
        ]
        usable = usable and not bad
    elif "quantized_layers" in section:
        problems.append(f"hf_quant_config.json: quantization.quantized_layers is given, but quant_algo is {algo!r}")
    return Plan(algo, kv, exclude or [], layers) if usable else None


def _native_plan(qc: dict, problems: list[str]) -> Plan:
    """config.json's quantization_config in the native fp8 form, which must be what the exporter writes
    (`configs.native_quantization_config`) key for key, `modules_to_not_convert` compared as a set -> its Plan."""
    exclude, kv = qc.get("modules_to_not_convert"), qc.get("kv_cache_quant_algo")
    if not (isinstance(exclude, list) and all(isinstance(m, str) for m in exclude)):
        problems.append("config.json: quantization_config.modules_to_not_convert must be a list of module names")
        exclude = []
    if kv not in (None, "FP8"):
        problems.append(f"config.json: quantization_config.kv_cache_quant_algo is {json.dumps(kv)}, expected \"FP8\" or none")
        kv = None
    expected = native_quantization_config(kv, exclude)
    for key in sorted(set(expected) | set(qc)):
        if key not in qc:
            problems.append(f"config.json: quantization_config.{key} is missing")
        elif key not in expected:
            problems.append(f"config.json: quantization_config.{key} is not a key of the native fp8 form")
        elif key != "modules_to_not_convert" and qc[key] != expected[key]:
            problems.append(f"config.json: quantization_config.{key} is {json.dumps(qc[key])}, expected {json.dumps(expected[key])}")
    return Plan(FP8_PB, kv, exclude, None, native=True)


def _check_config_quantization(config: dict, quant: dict, plan: Plan | None, problems: list[str]) -> None:
    """config.json's quantization_config (what vLLM and SGLang read first) must be what ModelOpt's exporter makes
    of hf_quant_config.json (`configs.quantization_config`), field for field."""
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        return problems.append("config.json: quantization_config is missing or not an object")
    if plan is None:
        return None
    producer = quant.get("producer")
    expected = quantization_config({**quant, "producer": producer})
    ignore, exclude = qc.get("ignore"), plan.exclude
    for key, value in expected.items():
        if key == "producer" and not isinstance(producer, dict):
            continue  # reported with hf_quant_config.json
        if key not in qc:
            problems.append(f"config.json: quantization_config.{key} is missing")
        elif key == "ignore" and plan.layers is None:
            if not (isinstance(ignore, list) and all(isinstance(p, str) for p in ignore)):
                problems.append("config.json: quantization_config.ignore must be a list of module patterns")
            elif sorted(ignore) != sorted(exclude):
                ignore_set, exclude_set = set(ignore), set(exclude)
                problems.append(
                    f"config.json: quantization_config.ignore differs from hf_quant_config.json's exclude_modules "
                    f"(only in ignore: {sorted(ignore_set - exclude_set)}; only in exclude_modules: "
                    f"{sorted(exclude_set - ignore_set)})"
                )
        elif not (key == "ignore" and plan.layers is None) and qc[key] != value:
            problems.append(f"config.json: quantization_config.{key} is {json.dumps(qc[key])}, expected {json.dumps(value)}")
    if "kv_cache_scheme" not in expected and qc.get("kv_cache_scheme") is not None:
        problems.append(
            f"config.json: quantization_config.kv_cache_scheme is {json.dumps(qc['kv_cache_scheme'])}, but "
            "kv_cache_quant_algo is null"
        )


def _model(config: dict, problems: list[str]):
    """The bridge of the unquantized model config.json describes (None if it cannot be made). quantization_config
    is left out: the bridge refuses it in a source checkpoint, and it is checked on its own."""
    from dist_quant.bridge.models import ModelBridge

    model = {k: v for k, v in config.items() if k != "quantization_config"}
    try:
        # shapes do not depend on the sequence length; seq_len=1 lets the keys that act only on long sequences
        # (sliding windows) pass, as the calibration that made the checkpoint judged them
        bridge = ModelBridge.from_hf(model, seq_len=1)
        bridge.hf_tensor_shapes()
        return bridge
    except Exception as error:  # a broken config can fail anywhere in the bridge; either way it is the config's
        problems.append(f"config.json: cannot derive the model's tensors ({type(error).__name__}: {error})")
        return None


def _check_tied_head(bridge, plan: Plan, problems: list[str]) -> None:
    """A head tied to the embedding has no tensor of its own and is never quantized: the configs must exclude it,
    or vLLM builds a quantized head, ties it to the embedding, and its scales never load (NVFP4: "was never
    loaded"; FP8: sentinel scales). vllm 0.33 model_executor/layers/quantization/modelopt.py is_layer_excluded."""
    if bridge.tied and plan.format_of("lm_head") is not None:
        problems.append(
            "lm_head is tied to the embedding and holds no tensor of its own, but the configs do not exclude it "
            f"({plan.why('lm_head')}): vLLM would build a quantized head whose scales never load"
        )


# -- the tensors -----------------------------------------------------------------------------------------
def _linear(module: str, shape: tuple[int, int], algo: str) -> dict[str, Spec]:
    """A quantized linear's tensors, as its weights' format writes them, and an input_scale exactly when its algo
    quantizes the input (W4A16_NVFP4 has none: vLLM 0.33 registers none for it, modelopt.py resolve)."""
    tensors = weight_format(algo).weight_tensors(module, shape)
    return tensors | ({f"{module}.input_scale": SCALAR} if input_quantized(algo) else {})


def _stored_format(dtype) -> str | None:
    """The weight format a stored weight's dtype shows: "NVFP4", "FP8", None (unquantized) or "?"."""
    by_dtype: dict = {}
    for weight, _ in LAYER_ALGOS:  # the formats checkpoints hold, the first of a dtype wins
        by_dtype.setdefault(FORMATS[weight].weight_dtype, FORMATS[weight].algo)
    return by_dtype.get(dtype, None if dtype in FLOATS else "?")


def _weight_format(algo: str | None) -> str | None:
    return None if algo is None else weight_format(algo).algo


def _expected(bridge, plan: Plan, stored: dict[str, Stored], problems: list[str]) -> tuple[dict, dict[str, str]]:
    """(tensor name -> Spec, quantized module -> format). A module stored in another format than the plan's is
    reported once and then checked as stored, so one mistake is not reported again for each of its scales."""
    shapes = bridge.hf_tensor_shapes()
    expected, formats = {}, {}
    for name in sorted(shapes, key=_natural):
        shape, module = shapes[name], name[: -len(".weight")]
        if not (name.endswith(".weight") and len(shape) == 2) or module.endswith("embed_tokens"):
            expected[name] = Spec(tuple(shape), FLOATS, "float")
            continue
        fmt = plan.format_of(module)
        planned_dtype = weight_format(fmt).weight_dtype if fmt is not None else None
        fits = name not in stored or stored[name].dtype == planned_dtype  # as planned (formats share dtypes)
        actual = _weight_format(fmt) if fits else _stored_format(stored[name].dtype)
        if actual not in (_weight_format(fmt), "?"):
            got = f"unquantized ({stored[name].dtype} weight)" if actual is None else f"as {actual}"
            problems.append(f"{module} is stored {got}, but {plan.why(module)}")
            # checked as stored from here on; an NVFP4 weight as W4A4 or W4A16 by whether it has an input scale
            fmt = actual if actual != "NVFP4" or f"{module}.input_scale" in stored else W4A16
        block = weight_format(fmt).block if fmt is not None else None
        if block is not None and shape[1] % block:
            problems.append(f"{module}: {shape[1]} input features do not split into {weight_format(fmt).algo} blocks of {block}")
        if fmt is None:
            expected[name] = Spec(tuple(shape), FLOATS, "float")
        else:
            expected |= _linear(module, tuple(shape), fmt)
            formats[module] = fmt
        kinds = next((kinds for suffix, kinds in _KV_SOURCES.items() if name.endswith(suffix)), "")
        for kind in kinds if plan.kv is not None else ():
            expected[bridge.kv_scale_name(module.rsplit(".", 1)[0], kind)] = SCALAR
    if plan.layers is not None:
        strangers = sorted(set(plan.layers) - {n[: -len(".weight")] for n in shapes})
        problems += [f"hf_quant_config.json: quantized_layers lists {m}, which the model has not" for m in strangers]
    return expected, formats


def _group(name: str) -> list[str]:
    """The layer and the expert a tensor belongs to, outermost first."""
    match = _GROUPS.match(name)
    if not match:
        return []
    return [match.group(3)] if match.group(3) else [match.group(2), match.group(1)]


@functools.lru_cache(maxsize=1 << 18)  # checkpoints of 75,000 names are sorted several times
def _natural(name: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def _grouped(names: set[str], universe, one, many) -> list[str]:
    """A line per name, or one per layer or expert all of whose tensors (in `universe`) are among `names`."""
    totals = Counter(g for n in universe for g in _group(n))
    hits = Counter(g for n in names for g in _group(n))
    lines, said = [], set()
    for name in sorted(names, key=_natural):
        group = next((g for g in _group(name) if hits[g] == totals[g] > 1), None)
        if group is None:
            lines.append(one(name))
        elif group not in said:
            said.add(group)
            lines.append(many(group, hits[group]))
    return lines


def _compare(expected: dict[str, Spec], storage: Storage, plan: Plan, problems: list[str]) -> set[str]:
    """Names, dtypes and shapes, from the headers. -> the expected tensors whose header is right."""
    stored = storage.tensors
    missing = {n for n in expected if n not in stored and n not in storage.lost}
    problems += _grouped(
        missing, expected, lambda n: f"{n} is missing", lambda group, count: f"{group}: all {count} tensors are missing"
    )

    def unexpected(name):
        if plan.kv is None and _KV_SCALE.search(name):
            return f"{name} is stored, but kv_cache_quant_algo is null"
        return f"{name} is not expected by config.json and hf_quant_config.json"

    extra = {n for n in stored if n not in expected}
    problems += _grouped(extra, stored, unexpected, lambda g, k: f"{g}: {k} tensors not expected by config.json")
    good = set()
    for name in sorted(set(expected) & set(stored), key=_natural):
        spec, tensor = expected[name], stored[name]
        if spec.role == "scale" and (tensor.dtype, tensor.shape) != (torch.float32, ()):
            problems.append(f"{name} must be a float32 scalar, got {tensor.dtype} {list(tensor.shape)}")
            continue
        if tensor.dtype not in spec.dtypes:
            problems.append(f"{name} has dtype {tensor.dtype}, expected {' or '.join(map(str, spec.dtypes))}")
        if tensor.shape != spec.shape:
            problems.append(f"{name} has shape {list(tensor.shape)}, expected {list(spec.shape)}")
        if tensor.dtype in spec.dtypes and tensor.shape == spec.shape:
            good.add(name)
    return good


def _values(stored: Stored, raw: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(raw.copy()).view(stored.dtype).reshape(stored.shape)


def _sibling_group(module: str) -> str:
    """The fused siblings a module belongs to (`parent.{q_proj,k_proj,v_proj}`), or the module alone."""
    parent, _, leaf = module.rpartition(".")
    group = next((g for g in SIBLINGS if leaf in g), None)
    return f"{parent}.{{{','.join(group)}}}" if group else module


def _check_values(
    expected, good: set[str], formats: dict[str, str], storage: Storage, problems: list[str], warnings: list[str],
    on_progress: Callable[[int, int], None] | None,
) -> None:
    """The values: positive finite scales, activation scales whose reciprocal is finite, finite unquantized tensors,
    shared sibling scales, and each quantized weight as its format checks it (`NumberFormat.check_values`: NaN
    bytes, block scales, finite dequantization), with the format's warning where its scales are not what its scale
    rule makes of the values (`top_warning`). Scalar scales are read and checked a file at a time, in a few array
    operations however many there are (a 30B MoE has ~75,000); packed weights are not read."""
    found: list[tuple[str, str]] = []  # (name, problem), put in name order at the end
    stored = storage.tensors
    packed = {n for n in good if expected[n].role == "weight" and stored[n].dtype == torch.uint8}
    nbytes = {name: stored[name].dtype.itemsize * math.prod(stored[name].shape) for name in good - packed}
    done, total = 0, sum(nbytes.values())

    def read(names) -> None:
        nonlocal done
        done += sum(nbytes[n] for n in names)
        if on_progress is not None:
            on_progress(done, total)

    read([])
    names = sorted(n for n in good if expected[n].role == "scale")
    values = np.concatenate([storage.raw(n) for n in names]).view(np.float32) if names else np.zeros(0, np.float32)
    fine = np.isfinite(values) & (values > 0)
    found += [(names[i], f"{names[i]} = {values[i].item()} is not a positive finite scale") for i in np.flatnonzero(~fine)]
    # The engines quantize activations by x * (1 / scale) or x / scale (vLLM 0.33 modelopt.py KNvfp4Dynamic:
    # input_global_scale_inv; SGLang 0.5.23 modelopt_quant.py: 1 / w13_input_scale): a positive scale below
    # 1 / float32's max makes that infinite.
    activation = np.array([n.endswith(ACTIVATION_SCALES) for n in names], dtype=bool)
    with np.errstate(divide="ignore", over="ignore"):
        overflows = fine & activation & ~np.isfinite(np.float32(1) / values)
    found += [
        (names[i], f"{names[i]} = {values[i].item()}: its reciprocal, which the engines compute to quantize "
                   "activations, overflows float32")
        for i in np.flatnonzero(overflows)
    ]
    scalars = {name: value for name, value, ok in zip(names, values, fine) if ok}
    read(names)
    owned: dict[str, list[str]] = {}  # module -> its tensors (a K/V scale joins its k_proj / v_proj: unread there)
    for name in good - packed:
        if expected[name].role != "float":
            owned.setdefault(name.rsplit(".", 1)[0], []).append(name)
    tops: dict[str, float] = {}
    for module in sorted(formats, key=_natural):
        mine = [n for n in owned.get(module, ()) if expected[n].role != "scale"]
        tensors = {n: _values(stored[n], storage.raw(n)) for n in mine}
        tensors |= {n: torch.tensor(scalars[n]) for n in owned.get(module, ()) if n in scalars}
        module_problems, top = weight_format(formats[module]).check_values(module, tensors)
        found += [(module, problem) for problem in module_problems]
        if top is not None:
            tops[module] = top
        read(mine)
    for name in sorted(n for n in good - packed if expected[n].role == "float"):
        if not torch.isfinite(_values(stored[name], storage.raw(name))).all():
            found.append((name, f"{name} holds NaN or Inf"))
        read([name])
    problems += [problem for _, problem in sorted(found, key=lambda item: _natural(item[0]))]
    # a weight's top among its siblings' where they share a calibrated amax (NVFP4, FP8), else its own
    judged: dict[str, tuple[str, list[float]]] = {}
    for module, top in tops.items():
        number = weight_format(formats[module])
        judged.setdefault(_sibling_group(module) if number.weight_amax else module, (formats[module], []))[1].append(top)
    for where, (algo, group_tops) in sorted(judged.items(), key=lambda item: _natural(item[0])):
        warning = weight_format(algo).top_warning(where, group_tops)
        if warning is not None:
            warnings.append(warning)
    for module in formats:
        parent, _, leaf = module.rpartition(".")
        group = next((g for g in SIBLINGS if g[0] == leaf), None)
        if group is None:
            continue
        members = [f"{parent}.{s}" for s in group]
        kinds = [formats.get(m) or "unquantized" for m in members]
        if len(set(kinds)) > 1:
            problems.append(f"{parent}.{{{','.join(group)}}} are {', '.join(kinds)}: vLLM fuses them into one layer")
            continue
        for scale in ("weight_scale_2", "input_scale"):
            values = [scalars.get(f"{m}.{scale}") for m in members]
            if all(v is not None for v in values) and len({v.tobytes() for v in values}) > 1:
                problems.append(f"{parent}.{{{','.join(group)}}}.{scale} differ: fused siblings share one scale")


def verify(directory: str | Path, on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Check the checkpoint against the model its config.json describes: every tensor present, none unexpected,
    dtypes and shapes, config fields and their agreement, the index, finite positive scales (activation scales
    with a finite reciprocal), finite tensors and fused siblings' shared scales (docs/checkpoint.md). -> a
    summary: quant_algo, kv_cache_quant_algo, quantized_modules, tensors, excluded, and warnings (lines: weights
    none of whose block scales or FP8 values reaches 448, which max calibration guarantees); raises
    VerificationError listing every problem.

    `on_progress(done_bytes, total_bytes)`, if given, is called as the value checks read tensor data: first with
    0, then after the scalar scales, after the block scales and after each FP8 weight and unquantized tensor,
    last with done_bytes == total_bytes. total_bytes is the tensor data the checks read (packed NVFP4 weights
    are not read), known once the headers are; a checkpoint whose configs or headers are broken fails before
    any call."""
    directory = Path(directory)
    if not directory.is_dir():
        raise VerificationError(f"{directory} is not a directory")
    problems: list[str] = []
    warnings: list[str] = []
    config = _read_json(directory / "config.json", problems)
    qc = config.get("quantization_config") if config is not None else None
    native = isinstance(qc, dict) and qc.get("quant_method") == NATIVE["quant_method"]
    if native:
        if (directory / "hf_quant_config.json").exists():  # the two forms at once: nothing more to hold it to
            _fail(directory, [
                "hf_quant_config.json is stored, but config.json's quantization_config has quant_method \"fp8\", "
                "the native FP8 block form, which has none (the engines read config.json's)"
            ])
        plan = _native_plan(qc, problems)
    else:
        quant = _read_json(directory / "hf_quant_config.json", problems)
        if config is None or quant is None:
            _fail(directory, problems)
        plan = _plan(quant, problems)
        _check_config_quantization(config, quant, plan, problems)
    bridge = _model(config, problems)
    if bridge is not None and plan is not None:
        _check_tied_head(bridge, plan, problems)
    with ExitStack() as stack:
        storage = Storage(directory, problems, stack)
        formats = {}
        if plan is not None and bridge is not None and storage.complete:
            expected, formats = _expected(bridge, plan, storage.tensors, problems)
            good = _compare(expected, storage, plan, problems)
            _check_values(expected, good, formats, storage, problems, warnings, on_progress)
    if problems:
        _fail(directory, problems)
    return {
        "quant_method": qc["quant_method"],
        "quant_algo": plan.algo,
        "kv_cache_quant_algo": plan.kv,
        "quantized_modules": len(formats),
        "tensors": len(storage.tensors),
        "excluded": plan.exclude,
        "warnings": warnings,
    }
