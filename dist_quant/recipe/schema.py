"""Recipe schema (docs/recipes.md): validated, immutable, resolved per quantizer name by fnmatch patterns."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Mapping

from dist_quant.formats import SPELLINGS, QuantFormat, select

METHODS = ("max", "mse")
SHARED_PATTERN_KEYS = ("weight", "input")


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file, the entry and the problem."""


# The linears the serving engines fuse into one layer and give one weight_scale_2 / input_scale, the one home of
# this fact: (their shared parent, as a regex; their names under it). vLLM's qkv_proj, DeepSeek's fused_qkv_a_proj
# (with a q LoRA; without one q_proj and kv_a_proj_with_mqa are two layers: two families), gate_up_proj (dense,
# shared experts, each routed expert), Mixtral's w13; last, in megatron's names, what megatron keeps apart (MLA's
# down projections; it fuses q/k/v into linear_qkv and gate/up into linear_fc1 itself). Calibration gives each
# family one global amax (the patterns below); the verifier checks that an export keeps one scale for it.
FUSED_SIBLINGS = (
    (r".*\.self_attn", ("q_proj", "k_proj", "v_proj")),
    (r".*\.self_attn", ("q_a_proj", "kv_a_proj_with_mqa")),
    (r".*\.self_attention", ("linear_q_down_proj", "linear_kv_down_proj")),
    (r".*", ("gate_proj", "up_proj")),
    (r".*\.experts\.\d+", ("w1", "w3")),
)
# Per role, the regexes grouping sibling quantizers (full match on logical quantizer names; the capture group is
# the family's parent)
DEFAULT_SHARED_PATTERNS = {
    role: tuple(rf"({parent})\.(?:{'|'.join(names)})\.{role}_quantizer" for parent, names in FUSED_SIBLINGS)
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
    """A cfg's common keys checked here, the rest by its format (formats/)."""
    cfg = r.mapping(cfg, where, ("num_bits", "axis", "block_sizes", "use_constant_amax"), ("num_bits",))
    r.choice(cfg["num_bits"], SPELLINGS, f"{where}.num_bits")
    blocks = cfg.get("block_sizes")
    if blocks is not None:  # each format checks the keys it takes; a block_sizes no format reads is refused here
        blocks = r.mapping(blocks, f"{where}.block_sizes", (-1, -2, "type", "scale_bits"))
    number = select(cfg["num_bits"], blocks)
    if cfg.get("axis") is not None:
        r.typed(cfg["axis"], int, f"{where}.axis", "an integer or null")
    r.typed(cfg.get("use_constant_amax", False), bool, f"{where}.use_constant_amax", "true or false")
    return number.parse(r, cfg, where)


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
