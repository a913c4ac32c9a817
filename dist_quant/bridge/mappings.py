"""Megatron <-> Hugging Face mappings: one class per way a tensor is laid out (docs/mappings.md).

A mapping pairs a Megatron parameter name with its Hugging Face name(s); `*` matches a layer or expert number
(the k-th `*` on one side is the k-th on the other). Each mapping says how the full Megatron tensor is split
over ranks (`shard_dim`, `stride`, `group`), how HF tensors become the full Megatron tensor and back, and which
slices of the HF tensors one rank needs, so a checkpoint can be read lazily.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch

from dist_quant.parallel.layout import shard


class Reader(Protocol):
    """Hugging Face tensors by name, whole or one slice along a dim (so a rank reads only its piece)."""

    def shape(self, name: str) -> torch.Size: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int = 0) -> torch.Tensor: ...


class BridgeError(ValueError):
    """A name, shape or layout the bridge cannot map."""


@dataclass(frozen=True)
class ShardInfo:
    """This rank's place: tensor-parallel (dense) and expert-tensor-parallel rank/size, EP rank, local experts."""

    tp_rank: int = 0
    tp_size: int = 1
    etp_rank: int = 0
    etp_size: int = 1
    ep_rank: int = 0
    experts_per_rank: int = 0

    def split(self, expert: bool) -> tuple[int, int]:
        return (self.etp_rank, self.etp_size) if expert else (self.tp_rank, self.tp_size)


@functools.cache  # a 30B MoE exports ~75,000 tensors, each matched against the whole table
def _regex(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\*", r"(\d+)") + "$")


def fill(pattern: str, wildcards: Sequence[str]) -> str:
    parts = pattern.split("*")
    if len(parts) - 1 != len(wildcards):
        raise BridgeError(f"{pattern!r} has {len(parts) - 1} wildcards, got {len(wildcards)} values")
    return "".join(p + w for p, w in zip(parts, [*wildcards, ""]))


@dataclass(frozen=True)
class Mapping:
    """A tensor whole on every rank (norms, router, q/k norms)."""

    megatron: str
    hf: tuple[str, ...]
    expert: bool = False  # the last `*` is the expert number: local on the Megatron side, global on the HF side
    allow_missing_hf: bool = False
    layers: tuple[int, ...] | None = None  # the layers that hold it (e.g. MoE layers of a mixed stack); None: all
    exported: bool = True  # False: a copy Megatron holds of another tensor (loaded, never exported)
    shard_dim: int | None = field(default=None, init=False)
    stride: int = field(default=1, init=False)

    def __post_init__(self):
        if isinstance(self.hf, str):
            object.__setattr__(self, "hf", (self.hf,))
        counts = {self.megatron.count("*")} | {name.count("*") for name in self.hf}
        if len(counts) != 1:
            raise BridgeError(f"{self}: both sides need the same number of wildcards")

    # -- names --------------------------------------------------------------------------------------------
    def match_megatron(self, name: str) -> tuple[str, ...] | None:
        m = _regex(self.megatron).match(name)
        return m.groups() if m else None

    def match_hf(self, name: str) -> tuple[str, ...] | None:
        for pattern in self.hf:
            m = _regex(pattern).match(name)
            if m:
                return m.groups()
        return None

    def hf_names(self, wildcards: Sequence[str]) -> list[str]:
        return [fill(p, wildcards) for p in self.hf]

    def local_to_global(self, wildcards: Sequence[str], info: ShardInfo) -> tuple[str, ...]:
        """Megatron-side wildcards (local expert number) -> logical ones (global expert number)."""
        if not self.expert:
            return tuple(wildcards)
        return (*wildcards[:-1], str(info.ep_rank * info.experts_per_rank + int(wildcards[-1])))

    # -- tensors ------------------------------------------------------------------------------------------
    def to_megatron(self, hf: list[torch.Tensor]) -> torch.Tensor:
        """The full (unsharded) Megatron tensor from the HF tensors."""
        return hf[0]

    def to_hf(self, full: torch.Tensor) -> list[torch.Tensor]:
        """The HF tensors from the full Megatron tensor."""
        return [full]

    def load(self, reader: Reader, hf_names: list[str], info: ShardInfo) -> torch.Tensor:
        """This rank's piece, reading only what it needs."""
        full = self.to_megatron([reader.read(name) for name in hf_names])
        if self.shard_dim is None:
            return full
        rank, size = info.split(self.expert)
        return shard(full, self.shard_dim, rank, size, self.stride)


@dataclass(frozen=True)
class ColumnParallelMapping(Mapping):
    """Split along dim 0 (output features): linear_fc1 without gating, output layer, vocab-parallel embedding."""

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "shard_dim", 0)

    def load(self, reader, hf_names, info):
        rank, size = info.split(self.expert)
        return _read_chunk(reader, hf_names[0], self.shard_dim, rank, size)


@dataclass(frozen=True)
class RowParallelMapping(ColumnParallelMapping):
    """Split along dim 1 (input features): linear_proj, linear_fc2."""

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "shard_dim", 1)


def _read_chunk(reader: Reader, name: str, dim: int, rank: int, size: int) -> torch.Tensor:
    """Chunk `rank` of `size` equal chunks of `name` along `dim`."""
    length = reader.shape(name)[dim]
    if length % size:
        raise BridgeError(f"{name}: dim {dim} of size {length} does not split {size} ways")
    chunk = length // size
    return reader.read(name, dim, rank * chunk, (rank + 1) * chunk) if size > 1 else reader.read(name)


@dataclass(frozen=True)
class GatedMLPMapping(ColumnParallelMapping):
    """linear_fc1 of a gated MLP <-> (gate_proj, up_proj): the full tensor is [gate; up], and TP rank r holds
    [gate_r; up_r] (stride 2), so gathering and chunking in two would be wrong for TP > 1."""

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "stride", 2)

    def to_megatron(self, hf):
        return torch.cat(hf, 0)

    def to_hf(self, full):
        return list(full.chunk(2, 0))

    def load(self, reader, hf_names, info):
        rank, size = info.split(self.expert)
        return torch.cat([_read_chunk(reader, name, 0, rank, size) for name in hf_names], 0)


@dataclass(frozen=True)
class QKVMapping(ColumnParallelMapping):
    """linear_qkv <-> (q_proj, k_proj, v_proj) with GQA: Megatron rows are grouped per query group as
    [q heads of group g, k_g, v_g]; TP splits whole groups (ng / TP per rank)."""

    num_heads: int = 1
    num_groups: int = 1
    head_dim: int = 1

    def _per_group(self, q, k, v) -> torch.Tensor:
        hpg, d = self.num_heads // self.num_groups, self.head_dim
        groups, tail = q.shape[0] // (hpg * d), q.shape[1:]  # tail: [in] for weights, [] for biases
        parts = [q.reshape(groups, hpg * d, *tail), k.reshape(groups, d, *tail), v.reshape(groups, d, *tail)]
        return torch.cat(parts, 1).reshape(groups * (hpg + 2) * d, *tail)

    def to_megatron(self, hf):
        return self._per_group(*hf)

    def to_hf(self, full):
        hpg, d = self.num_heads // self.num_groups, self.head_dim
        grouped = full.reshape(self.num_groups, (hpg + 2) * d, *full.shape[1:])
        q, k, v = grouped.split([hpg * d, d, d], 1)
        return [t.reshape(-1, *full.shape[1:]) for t in (q, k, v)]

    def load(self, reader, hf_names, info):
        rank, size = info.split(self.expert)
        if self.num_groups % size:
            raise BridgeError(f"{self.megatron}: {self.num_groups} query groups do not split over TP={size}")
        expected = [self.num_heads * self.head_dim, self.num_groups * self.head_dim, self.num_groups * self.head_dim]
        for name, rows in zip(hf_names, expected):
            if reader.shape(name)[0] != rows:
                raise BridgeError(f"{name}: {reader.shape(name)[0]} rows, expected {rows} for this attention layout")
        return self._per_group(*(_read_chunk(reader, name, 0, rank, size) for name in hf_names))


@dataclass(frozen=True)
class ConcatenatedQKVMapping(ColumnParallelMapping):
    """A fused QKV whose rows are [all q; all k; all v] (not grouped per query group, as Megatron's are)."""

    def to_megatron(self, hf):
        return torch.cat(hf, 0)

    def to_hf(self, full):
        raise BridgeError(f"{self.megatron}: a concatenated QKV cannot be split back without its head sizes")


@dataclass(frozen=True)
class AmaxMapping(Mapping):
    """A quantizer amax: one Megatron value fanned out to each HF sibling; siblings come back as their max."""

    def to_megatron(self, hf):
        return torch.stack(hf).amax(0)

    def to_hf(self, full):
        return [full] * len(self.hf)


_LINEAR_WEIGHT = ".weight"
_QKV_SUFFIX = ".self_attention.linear_qkv.weight"
_HF_QKV = (".q_proj.weight", ".k_proj.weight", ".v_proj.weight")
_LATENT_KV_SUFFIX, _HF_LATENT_KV = ".self_attention.linear_kv_up_proj.weight", ".kv_b_proj.weight"


def _amax_name(weight_name: str, quantizer: str, buffer: str = "_amax") -> str:
    return weight_name[: -len(_LINEAR_WEIGHT)] + f".{quantizer}.{buffer}"


def _is_draft(name: str) -> bool:
    return any(part.startswith(("mtp", "draft")) for part in name.split("."))


def kv_bmm_mappings(mapping: Mapping) -> list[Mapping]:
    """K/V BMM amax mappings derived from the weight mapping whose output holds the attention's keys and values
    (docs/mappings.md): an interleaved `.self_attention.linear_qkv.weight` whose q/k/v share one HF parent, or
    multi-latent attention's `.self_attention.linear_kv_up_proj.weight` <-> `.kv_b_proj.weight`; not allowed to
    miss, not a draft/MTP layer. They are replicated and may miss on the HF side; wildcards and prefixes are kept
    as they are."""
    if mapping.allow_missing_hf or _is_draft(mapping.megatron) or any(_is_draft(h) for h in mapping.hf):
        return []
    if type(mapping) is QKVMapping and mapping.megatron.endswith(_QKV_SUFFIX) and len(mapping.hf) == 3:
        parents = {h[: -len(suffix)] for h, suffix in zip(mapping.hf, _HF_QKV) if h.endswith(suffix)}
        if len(parents) != 1 or not all(h.endswith(s) for h, s in zip(mapping.hf, _HF_QKV)):
            return []
        hf_parent, megatron_layer = parents.pop(), mapping.megatron[: -len(_QKV_SUFFIX)]
    elif (
        type(mapping) is ColumnParallelMapping and mapping.megatron.endswith(_LATENT_KV_SUFFIX)
        and len(mapping.hf) == 1 and mapping.hf[0].endswith(_HF_LATENT_KV)
    ):
        hf_parent, megatron_layer = mapping.hf[0][: -len(_HF_LATENT_KV)], mapping.megatron[: -len(_LATENT_KV_SUFFIX)]
    else:
        return []
    megatron_parent = megatron_layer + ".self_attention.core_attention"
    return [
        AmaxMapping(f"{megatron_parent}.{kv}_bmm_quantizer._amax", (f"{hf_parent}.{kv}_bmm_quantizer._amax",), allow_missing_hf=True)
        for kv in ("k", "v")
    ]


def quant_state_mappings(mapping: Mapping) -> list[Mapping]:
    """Quantizer-state mappings derived from a linear weight mapping: each `_amax` is a small replicated tensor,
    fanned out to every HF sibling of a fused Megatron weight (q/k/v, gate/up), never TP-chunked."""
    if not isinstance(mapping, ColumnParallelMapping) or not mapping.megatron.endswith(_LINEAR_WEIGHT):
        return []
    derived = [
        AmaxMapping(
            _amax_name(mapping.megatron, quantizer, buffer),
            tuple(_amax_name(h, quantizer, buffer) for h in mapping.hf),
            expert=mapping.expert,
            allow_missing_hf=mapping.allow_missing_hf,
        )
        for quantizer in ("weight_quantizer", "input_quantizer")
        for buffer in ("_amax", "_global_amax")
    ]
    # Static NVFP4 block amax [out, in / 16] are laid out like the weight's rows and blocks: same mapping.
    block = dataclasses.replace(
        mapping,
        megatron=_amax_name(mapping.megatron, "weight_quantizer", "_block_amax"),
        hf=tuple(_amax_name(h, "weight_quantizer", "_block_amax") for h in mapping.hf),
    )
    return derived + [block] + kv_bmm_mappings(mapping)
