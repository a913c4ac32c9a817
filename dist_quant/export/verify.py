"""Checking an exported checkpoint against the format rules of SPEC.md section 2, and dequantizing it."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch

from dist_quant.numerics import nvfp4_dequantize

NAN_E4M3_BYTES = (0x7F, 0xFF)
QUANT_KEYS = ("quant_algo", "kv_cache_quant_algo", "group_size", "exclude_modules")
CONFIG_KEYS = ("quant_method", "quant_algo", "kv_cache_scheme", "ignore")
_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(.*)$")
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


class VerificationError(ValueError):
    """A checkpoint breaks the format; the message lists every problem found."""


def load_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    tensors = {}
    for file in files:
        tensors.update(load_file(directory / file))
    return tensors


def _scalar_f32(problems, tensors, name):
    t = tensors.get(name)
    if t is None:
        problems.append(f"{name} is missing")
    elif t.dtype != torch.float32 or t.numel() != 1:
        problems.append(f"{name} must be a float32 scalar, got {t.dtype} {tuple(t.shape)}")
    elif not (torch.isfinite(t).all() and (t > 0).all()):
        problems.append(f"{name} = {t.item()} is not a positive finite scale")


def _check_module(problems, tensors, module) -> str | None:
    weight, scale = tensors[f"{module}.weight"], tensors.get(f"{module}.weight_scale")
    if weight.dtype == torch.uint8:
        if scale is None or scale.dtype != torch.float8_e4m3fn:
            return problems.append(f"{module}.weight_scale must be float8_e4m3fn for NVFP4, got {None if scale is None else scale.dtype}")
        if tuple(scale.shape) != (weight.shape[0], weight.shape[1] * 2 // 16):
            problems.append(f"{module}.weight_scale has shape {tuple(scale.shape)} for a packed weight {tuple(weight.shape)}")
        if any((scale.view(torch.uint8) == b).any() for b in NAN_E4M3_BYTES):
            problems.append(f"{module}.weight_scale holds NaN bytes")
        elif not (scale.float() > 0).all():
            problems.append(f"{module}.weight_scale holds zero or negative scales")
        _scalar_f32(problems, tensors, f"{module}.weight_scale_2")
        if not problems and not torch.isfinite(nvfp4_dequantize(weight, scale, tensors[f"{module}.weight_scale_2"])).all():
            problems.append(f"{module} dequantizes to non-finite values")
        return "NVFP4"
    if weight.dtype == torch.float8_e4m3fn:
        _scalar_f32(problems, tensors, f"{module}.weight_scale")
        return "FP8"
    return problems.append(f"{module}.weight is {weight.dtype}, which is neither NVFP4 (uint8) nor FP8")


def verify(directory: str | Path) -> dict:
    """Check keys, dtypes, shapes, config fields, NaN-free scales, every expert's tensors and fused siblings'
    shared scales. -> a summary; raises VerificationError listing every problem."""
    directory = Path(directory)
    if not directory.is_dir():
        raise VerificationError(f"{directory} is not a directory")
    problems: list[str] = []
    for file in ("config.json", "hf_quant_config.json"):
        if not (directory / file).is_file():
            raise VerificationError(f"{directory}: {file} is missing")
    quant = json.loads((directory / "hf_quant_config.json").read_text())
    config = json.loads((directory / "config.json").read_text())
    section = quant.get("quantization", {})
    problems += [f"hf_quant_config.json: quantization.{k} is missing" for k in QUANT_KEYS if k not in section]
    if not {"name", "version"} <= set(quant.get("producer", {})):
        problems.append("hf_quant_config.json: producer needs name and version")
    qc = config.get("quantization_config", {})
    problems += [f"config.json: quantization_config.{k} is missing" for k in CONFIG_KEYS if k not in qc]
    if qc.get("quant_method") not in (None, "modelopt"):
        problems.append(f"config.json: quant_method is {qc.get('quant_method')!r}, expected 'modelopt'")

    tensors = load_tensors(directory)
    algos = {}
    for name in sorted(tensors):
        if name.endswith(".weight_scale") and f"{name[: -len('_scale')]}" in tensors:
            module = name[: -len(".weight_scale")]
            algos[module] = _check_module(problems, tensors, module)
            if f"{module}.input_scale" in tensors:
                _scalar_f32(problems, tensors, f"{module}.input_scale")
        elif tensors[name].is_floating_point() and tensors[name].dtype != torch.float8_e4m3fn and not torch.isfinite(tensors[name]).all():
            problems.append(f"{name} holds NaN or Inf")

    experts = defaultdict(lambda: defaultdict(set))
    for name in tensors:
        match = _EXPERT.match(name)
        if match:
            experts[match.group(1)][int(match.group(2))].add(match.group(3))
    count = config.get("num_experts") or config.get("num_local_experts")
    for layer, by_expert in experts.items():
        every = set().union(*by_expert.values())
        for index in range(count or max(by_expert) + 1):
            missing = every - by_expert.get(index, set())
            if missing:
                problems.append(f"{layer}.{index} lacks {', '.join(sorted(missing))}")

    for module in algos:
        parent, _, leaf = module.rpartition(".")
        for group in SIBLINGS:
            if leaf == group[0]:
                for scale in ("weight_scale_2", "input_scale"):
                    values = [tensors.get(f"{parent}.{s}.{scale}") for s in group]
                    if all(v is not None for v in values) and not all(torch.equal(values[0], v) for v in values):
                        problems.append(f"{parent}.{{{','.join(group)}}}.{scale} differ: fused siblings share one scale")

    kv = section.get("kv_cache_quant_algo")
    if kv is not None:
        layers = {m.rsplit(".self_attn", 1)[0] for m in tensors if ".self_attn." in m}
        for layer in sorted(layers):
            for kind in ("k", "v"):
                if f"{layer}.self_attn.{kind}_proj.{kind}_scale" not in tensors:
                    problems.append(f"{layer}.self_attn.{kind}_proj.{kind}_scale is missing (kv_cache_quant_algo {kv})")
                else:
                    _scalar_f32(problems, tensors, f"{layer}.self_attn.{kind}_proj.{kind}_scale")
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise VerificationError(f"{directory}: {len(problems)} problems:\n  " + "\n  ".join(shown))
    return {
        "quant_algo": section.get("quant_algo"),
        "kv_cache_quant_algo": kv,
        "quantized_modules": len(algos),
        "tensors": len(tensors),
        "excluded": section.get("exclude_modules", []),
    }
