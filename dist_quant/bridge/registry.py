"""The mapping table of a model, looked up either way, with the quantizer-state mappings derived from it."""

from __future__ import annotations

import re
from typing import Iterable

from dist_quant.bridge.mappings import BridgeError, Mapping, fill, quant_state_mappings


_WHOLE = re.compile(r"\*|(?!\d+$)[^*]+")  # a component: `*`, or literal text that is not a number
_NUMBER = re.compile(r"(?<![^.])\d+(?![^.])")  # a whole dotted component that is a number


def _listing(names: list[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


class MappingRegistry:
    """Weight mappings, plus (with `quant_state`, off by default, on for models that carry quantizers) the
    `*_quantizer._amax` mappings derived from them. Names are logical: global layer and expert numbers."""

    def __init__(self, mappings: Iterable[Mapping], quant_state: bool = False):
        self.weights = tuple(mappings)
        self.quant_state = quant_state
        derived = [q for m in self.weights for q in quant_state_mappings(m)] if quant_state else []
        self.mappings = self.weights + tuple(derived)
        # Where every `*` is a whole dotted component and no literal component is a number, a name matches a
        # pattern exactly when its numbers, written as `*`, give the pattern: one dict lookup instead of a regex
        # per mapping (a 30B MoE streams ~130,000 names).
        self._by_pattern: dict[str, Mapping] | None = {}
        for mapping in self.mappings:
            if not all(_WHOLE.fullmatch(part) for part in mapping.megatron.split(".")):
                self._by_pattern = None
                break
            self._by_pattern.setdefault(mapping.megatron, mapping)

    def with_quant_state(self, enabled: bool = True) -> "MappingRegistry":
        return MappingRegistry(self.weights, quant_state=enabled)

    def megatron_to_hf(self, name: str) -> tuple[Mapping, tuple[str, ...], list[str]]:
        """-> (mapping, wildcard values, HF names) for a logical Megatron name."""
        if self._by_pattern is not None:
            mapping = self._by_pattern.get(_NUMBER.sub("*", name))
            wildcards = mapping.match_megatron(name) if mapping is not None else None
            if wildcards is None:
                raise BridgeError(f"no mapping for Megatron name {name!r}")
            return mapping, wildcards, mapping.hf_names(wildcards)
        for mapping in self.mappings:
            wildcards = mapping.match_megatron(name)
            if wildcards is not None:
                return mapping, wildcards, mapping.hf_names(wildcards)
        raise BridgeError(f"no mapping for Megatron name {name!r}")

    def hf_to_megatron(self, name: str) -> tuple[Mapping, tuple[str, ...], str]:
        """-> (mapping, wildcard values, logical Megatron name) for an HF name."""
        for mapping in self.mappings:
            wildcards = mapping.match_hf(name)
            if wildcards is not None:
                return mapping, wildcards, fill(mapping.megatron, wildcards)
        raise BridgeError(f"no mapping for Hugging Face name {name!r}")

    def check(self, megatron_names: Iterable[str] = (), hf_names: Iterable[str] = ()) -> None:
        """Raise one BridgeError listing every name on either side that no mapping covers."""
        unmapped_megatron = [n for n in megatron_names if not any(m.match_megatron(n) is not None for m in self.mappings)]
        unmapped_hf = [n for n in hf_names if not any(m.match_hf(n) is not None for m in self.mappings)]
        problems = []
        if unmapped_megatron:
            problems.append(f"Megatron names without a mapping: {_listing(unmapped_megatron)}")
        if unmapped_hf:
            problems.append(f"Hugging Face names without a mapping: {_listing(unmapped_hf)}")
        if problems:
            raise BridgeError("; ".join(problems))
