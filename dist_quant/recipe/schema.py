"""Recipe schema (docs/recipes.md): validated, immutable, resolved per quantizer name by fnmatch patterns."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Mapping

from dist_quant.numerics.nvfp4 import BLOCK_SIZE
from dist_quant.quantizer import DYNAMIC, FP8, NVFP4, STATIC, QuantFormat

METHODS = ("max", "mse")
SHARED_PATTERN_KEYS = ("weight", "input")
# num_bits spellings: dist_quant has no integer formats, so 8 and 4 name the 8- and 4-bit float formats.
NUM_BITS = {"e4m3": FP8, "e2m1": NVFP4, 8: FP8, 4: NVFP4}


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file, the entry and the problem."""


# Sibling quantizers that must share one NVFP4 global amax, because vLLM / TensorRT-LLM fuse them and keep one
# weight_scale_2 / input_scale. The first group of each regex names the group (full match on logical quantizer
# names). Megatron already fuses q/k/v (linear_qkv) and gate/up (linear_fc1), so one quantizer covers them.
DEFAULT_SHARED_PATTERNS = {
    role: (
        rf"(.*\.self_attn)\.[qkv]_proj\.{role}_quantizer",  # attention q/k/v
        # multi-latent attention's down projections of the same input (vLLM's fused_qkv_a_proj), in transformers'
        # names and megatron's (which keeps them apart). The group keeps the dot: without a q LoRA, q_proj (the
        # line above) and kv_a_proj_with_mqa are two layers in vLLM, so two groups.
        rf"(.*\.self_attn\.)(?:q_a_proj|kv_a_proj_with_mqa)\.{role}_quantizer",
        rf"(.*\.self_attention)\.linear_(?:q|kv)_down_proj\.{role}_quantizer",
        rf"(.*)\.(?:gate|up)_proj\.{role}_quantizer",  # gated MLP: dense, each expert, the shared expert
        rf"(.*\.experts\.\d+)\.w[13]\.{role}_quantizer",  # Mixtral-style experts: w1 / w3
    )
    for role in SHARED_PATTERN_KEYS
}


# expert_inputs: shared -- every expert's linear_fc1 input of an MoE layer one group, every linear_fc2 input another
EXPERT_INPUTS = ("per_expert", "shared")
SHARED_EXPERT_INPUTS = r"(.*\.mlp\.experts)\.local_experts\.\d+\.(linear_fc[12])\.input_quantizer"


@dataclass(frozen=True)
class Algorithm:
    method: str = "max"
    fp8_scale_sweep: bool = False
    # Per role, replaces DEFAULT_SHARED_PATTERNS; [] turns that role's grouping off.
    shared_patterns: Mapping[str, tuple[str, ...]] | None = None
    # "shared": one NVFP4 input amax for all experts of an MoE layer, per linear (the max over them, over every
    # expert-parallel rank), as vLLM's FlashInfer MoE backends and SGLang use; "per_expert": each its own.
    expert_inputs: str = "per_expert"

    def sibling_patterns(self, role: str) -> tuple[str, ...]:
        """The regexes grouping `role` ("weight" or "input") quantizers: the recipe's, else the built-ins; with
        expert_inputs shared, the experts' inputs of a layer first."""
        patterns = tuple({**DEFAULT_SHARED_PATTERNS, **(self.shared_patterns or {})}[role])
        return (SHARED_EXPERT_INPUTS, *patterns) if role == "input" and self.expert_inputs == "shared" else patterns


@dataclass(frozen=True)
class QuantCfgEntry:
    quantizer_name: str
    enable: bool
    fmt: QuantFormat | None


@dataclass(frozen=True)
class Recipe:
    name: str
    source: str
    quant_cfg: tuple[QuantCfgEntry, ...]
    algorithm: Algorithm = field(default_factory=Algorithm)
    recipe_type: str = "ptq"
    description: str = ""

    def format_for(self, quantizer_name: str) -> QuantFormat | None:
        """The format of the named quantizer, None when disabled. Later entries win."""
        fmt, enabled, enabling_entry = None, False, None
        for index, entry in enumerate(self.quant_cfg):
            if fnmatchcase(quantizer_name, entry.quantizer_name):
                fmt = entry.fmt or fmt
                enabled, enabling_entry = entry.enable, index
        if enabled and fmt is None:
            raise RecipeError(
                f"recipe {self.source}: quant_cfg[{enabling_entry}] enables {quantizer_name!r}, "
                "but no entry gives it a cfg"
            )
        return fmt if enabled else None


class _Reader:
    """Walks raw YAML data, raising RecipeError with the path of the offending value."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, problem: str) -> RecipeError:
        return RecipeError(f"recipe {self.source}: {where}: {problem}")

    def mapping(self, value: Any, where: str, allowed: tuple, required: tuple = ()) -> Mapping:
        if not isinstance(value, Mapping):
            raise self.fail(where, f"expected a mapping, got {type(value).__name__}")
        unknown = [k for k in value if k not in allowed]
        if unknown:
            raise self.fail(where, f"unknown key {unknown[0]!r} (allowed: {', '.join(map(str, allowed))})")
        missing = [k for k in required if k not in value]
        if missing:
            raise self.fail(where, f"missing key {missing[0]!r}")
        return value

    def typed(self, value: Any, kind: type | tuple, where: str, label: str) -> Any:
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.fail(where, f"expected {label}, got {value!r}")
        return value

    def choice(self, value: Any, choices, where: str) -> Any:
        if value not in choices or isinstance(value, bool):
            raise self.fail(where, f"{value!r} is not one of {', '.join(map(str, choices))}")
        return value


def _parse_format(r: _Reader, cfg: Any, where: str) -> QuantFormat:
    cfg = r.mapping(cfg, where, ("num_bits", "axis", "block_sizes", "use_constant_amax"), ("num_bits",))
    kind = NUM_BITS[r.choice(cfg["num_bits"], tuple(NUM_BITS), f"{where}.num_bits")]
    axis = cfg.get("axis")
    if axis is not None:
        r.typed(axis, int, f"{where}.axis", "an integer or null")
    constant = r.typed(cfg.get("use_constant_amax", False), bool, f"{where}.use_constant_amax", "true or false")
    blocks = cfg.get("block_sizes")
    if kind == FP8:
        if blocks is not None:
            raise r.fail(f"{where}.block_sizes", "block scaling is only supported with num_bits e2m1 (NVFP4)")
        return QuantFormat(FP8, axis=axis, use_constant_amax=constant)
    if axis is not None:
        raise r.fail(f"{where}.axis", "e2m1 is block-scaled along the last dimension; axis must be null")
    if blocks is None:
        raise r.fail(where, f"e2m1 needs block_sizes {{-1: {BLOCK_SIZE}, type: dynamic|static, scale_bits: e4m3}}")
    blocks = r.mapping(blocks, f"{where}.block_sizes", (-1, "type", "scale_bits"), (-1,))
    if blocks[-1] != BLOCK_SIZE or isinstance(blocks[-1], bool):
        raise r.fail(f"{where}.block_sizes", f"block size must be {BLOCK_SIZE} for e2m1, got {blocks[-1]!r}")
    block_type = r.choice(blocks.get("type", DYNAMIC), (DYNAMIC, STATIC), f"{where}.block_sizes.type")
    r.choice(blocks.get("scale_bits", "e4m3"), ("e4m3",), f"{where}.block_sizes.scale_bits")
    if constant and block_type == STATIC:
        raise r.fail(where, "use_constant_amax needs dynamic blocks: a constant amax has no per-block values")
    return QuantFormat(NVFP4, block_type=block_type, use_constant_amax=constant)


def _parse_entry(r: _Reader, raw: Any, index: int) -> QuantCfgEntry:
    where = f"quant_cfg[{index}]"
    raw = r.mapping(raw, where, ("quantizer_name", "enable", "cfg"), ("quantizer_name",))
    pattern = raw["quantizer_name"]
    if not isinstance(pattern, str) or not pattern:
        raise r.fail(f"{where}.quantizer_name", f"expected a non-empty fnmatch pattern, got {pattern!r}")
    where = f"{where} ({pattern!r})"
    if "enable" not in raw and "cfg" not in raw:
        raise r.fail(where, "needs 'enable', 'cfg' or both")
    enable = r.typed(raw.get("enable", True), bool, f"{where}.enable", "true or false")
    fmt = _parse_format(r, raw["cfg"], f"{where}.cfg") if "cfg" in raw else None
    return QuantCfgEntry(pattern, enable, fmt)


def _parse_shared_patterns(r: _Reader, raw: Any) -> dict[str, tuple[str, ...]]:
    where = "algorithm.shared_patterns"
    raw = r.mapping(raw, where, SHARED_PATTERN_KEYS)
    parsed = {}
    for key, patterns in raw.items():
        if not isinstance(patterns, list):
            raise r.fail(f"{where}.{key}", f"expected a list of regular expressions, got {patterns!r}")
        for pattern in patterns:
            try:
                re.compile(r.typed(pattern, str, f"{where}.{key}", "a regular expression string"))
            except re.error as error:
                raise r.fail(f"{where}.{key}", f"pattern {pattern!r} does not compile: {error}") from None
        parsed[key] = tuple(patterns)
    return parsed


def _parse_algorithm(r: _Reader, raw: Any) -> Algorithm:
    if isinstance(raw, str):
        raw = {"method": raw}
    raw = r.mapping(raw, "algorithm", ("method", "fp8_scale_sweep", "shared_patterns", "expert_inputs"))
    method = r.choice(raw.get("method", "max"), METHODS, "algorithm.method")
    sweep = r.typed(raw.get("fp8_scale_sweep", False), bool, "algorithm.fp8_scale_sweep", "true or false")
    if sweep and method != "mse":
        raise r.fail("algorithm.fp8_scale_sweep", "needs method mse")
    if method == "mse" and not sweep:
        raise r.fail("algorithm", "method mse needs fp8_scale_sweep: true (the FP8 scale sweep is the MSE search)")
    shared = _parse_shared_patterns(r, raw["shared_patterns"]) if "shared_patterns" in raw else None
    expert_inputs = r.choice(raw.get("expert_inputs", "per_expert"), EXPERT_INPUTS, "algorithm.expert_inputs")
    return Algorithm(method, sweep, shared, expert_inputs)


def parse_recipe(raw: Any, name: str, source: str) -> Recipe:
    r = _Reader(source)
    raw = r.mapping(raw, "top level", ("metadata", "quantize"), ("quantize",))
    metadata = r.mapping(raw.get("metadata") or {}, "metadata", ("recipe_type", "description"))
    for key in ("recipe_type", "description"):
        r.typed(metadata.get(key, ""), str, f"metadata.{key}", "a string")
    quantize = r.mapping(raw["quantize"], "quantize", ("algorithm", "quant_cfg"), ("quant_cfg",))
    entries = quantize["quant_cfg"]
    if not isinstance(entries, list) or not entries:
        raise r.fail("quantize.quant_cfg", "expected a non-empty list of entries")
    return Recipe(
        name=name,
        source=source,
        quant_cfg=tuple(_parse_entry(r, entry, i) for i, entry in enumerate(entries)),
        algorithm=_parse_algorithm(r, quantize.get("algorithm", "max")),
        recipe_type=metadata.get("recipe_type", "ptq"),
        description=metadata.get("description", ""),
    )
