"""Reading a Hugging Face config.json through one explicit table of the keys an architecture understands.

Every key of the file is looked up in the table: a key the bridge reads is checked for a usable value, a key that
changes nothing in the forward is accepted as such, a key whose value the bridge cannot compute exactly is refused,
and a key the table does not know is refused too, since nothing vouches that it leaves the forward alone. Each
refusal is one line naming the key and its value, raised before any rank builds a model.

A key's rule checks its value in two passes: first the value alone (its type, its range), then, once every key's
own value has passed, against the other keys (`relation`: e.g. num_key_value_heads must divide
num_attention_heads), so that a relation never meets another key's value of the wrong type.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Callable

import torch

from dist_quant.bridge.mappings import BridgeError
from dist_quant.bridge.rope import RopeSpec

ROPE_KEYS = ("rope_scaling", "rope_parameters")  # transformers' priority
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Layers and experts are counted out one by one (their names, megatron's modules) before the model's size can be
# weighed against the ranks' memory: counts beyond this, far above any model's (a few hundred), are refused.
MAX_COUNT = 65_536


@dataclass(frozen=True)
class Rule:
    """What the bridge does with one config key. `check(value, config, seq_len)` -> why the value alone cannot be
    honoured, or None; `relation(value, config, seq_len)` -> why it cannot be honoured with the other keys' values,
    asked once every key's own check has passed. `note` says it in words (docs, error messages)."""

    note: str
    check: Callable[..., str | None] | None = None
    relation: Callable[..., str | None] | None = None

    def problem(self, value, config: "HFConfig", seq_len: int | None) -> str | None:
        return self.check(value, config, seq_len) if self.check else None

    def related_problem(self, value, config: "HFConfig", seq_len: int | None) -> str | None:
        return self.relation(value, config, seq_len) if self.relation else None


def inert(why: str) -> Rule:
    return Rule(f"changes nothing in the forward: {why}")


def used(kind: type | tuple, what: str, positive: bool = False, at_least: int | None = None,
         at_most: int | None = None, relation: Callable[..., str | None] | None = None) -> Rule:
    """A value the bridge reads into the model: of `kind`, finite, above 0 where `positive`, within `at_least` and
    `at_most` where given, and then fitting the other keys (`relation`)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)

    def check(value, config, seq_len):
        if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
            return f"expected {what}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"expected {what}, not {value}"
        if isinstance(value, int) and value.bit_length() > 63:  # JSON integers are unbounded; torch's sizes are int64
            return f"expected {what} below 2^63"
        if positive and not value > 0:
            return f"expected {what} above 0"
        if at_least is not None and value < at_least:
            return f"expected {what} of at least {at_least}"
        if at_most is not None and value > at_most:
            return f"expected {what} of at most {at_most:,}"
        return None

    return Rule(f"read: {what}", check, relation)


def only(allowed: tuple, why: str) -> Rule:
    """Implemented for these values only."""

    def check(value, config, seq_len):
        return None if value in allowed else why

    return Rule(f"implemented for {', '.join(map(repr, allowed))} only", check)


def refused(why: str) -> Rule:
    return Rule(f"refused: {why}", lambda value, config, seq_len: why)


def _dtype(value, config, seq_len):
    return None if value in DTYPES else f"expected one of {', '.join(DTYPES)}"


def rope_check(key: str) -> Callable:
    """The rope's problem, reported once, under the key that defines it: the rope parameters, else rope_theta,
    else partial_rotary_factor."""

    def check(value, config, seq_len):
        owners = (*ROPE_KEYS, "rope_theta", "partial_rotary_factor")
        owner = next((k for k in owners if config.raw.get(k) is not None), None)
        return config.rope.problem(config.partial_rotary) if key == owner else None

    return check


def _query_groups(value, config, seq_len):
    heads = config.get("num_attention_heads")
    if heads is not None and heads % value:
        return f"expected a divisor of num_attention_heads ({heads}): every query group serves as many heads"
    return None


def _head_size(key: str) -> Callable:
    """The per-head size: head_dim where config.json gives it, else hidden_size / num_attention_heads, which must
    then divide evenly (transformers' Llama config refuses the rest); its rotated part must be an even number of
    channels (rotary embeddings turn channels in pairs; transformers and megatron-core fail on an odd one).
    Reported once: under head_dim where given, else under num_attention_heads."""

    def relation(value, config, seq_len):
        given = config.raw.get("head_dim") is not None
        hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
        if key != ("head_dim" if given else "num_attention_heads") or not given and hidden is None:
            return None
        if not given and hidden % heads:
            return (
                f"hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads}), and config.json gives no "
                "head_dim (the per-head size is then hidden_size / num_attention_heads)"
            )
        size = value if given else hidden // heads
        fraction = config.rope.partial_rotary_factor
        if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            return None  # the rope's rule says why
        rotary = int(size * fraction)
        if rotary < 2 or rotary % 2:
            factor = f" x partial_rotary_factor {fraction}" if fraction != 1 else ""
            return (
                f"each head rotates {rotary} of its {size} channels (head size{factor}): rotary embeddings turn "
                "channels in pairs, so that must be an even number"
            )
        return None

    return relation


def _one_of(allowed: tuple, why: str) -> Callable[[object], str | None]:
    return lambda value: None if value in allowed else f"expected {' or '.join(map(repr, allowed))}: {why}"


def _block_size(value) -> str | None:
    if not (
        isinstance(value, list) and len(value) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) and 0 < n < 2**31 for n in value)
    ):
        return "expected two positive integers, the rows and columns of a weight block"
    return None


def _module_names(value) -> str | None:
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        return "expected a list of module names"
    return None


# quantization_config of an FP8 block-scaled checkpoint, key by key (DeepSeek-V3's README_WEIGHTS.md, transformers'
# FineGrainedFP8Config, which writes every one of them, vLLM's Fp8Config): value -> why its weights cannot be
# dequantized as DeepSeek's reference does (inference/kernel.py weight_dequant), or None. A null value is as if
# absent; quant_method and weight_block_size are required.
FP8_SOURCE_KEYS: dict[str, Callable[[object], str | None]] = {
    "quant_method": lambda value: None,  # 'fp8', checked before the other keys
    "weight_block_size": _block_size,
    "fmt": _one_of(("e4m3",), "the weights are read as float8_e4m3fn"),
    "activation_scheme": _one_of(("dynamic",), "a static scheme ships activation scales, which dist_quant does not read"),
    "scale_fmt": _one_of(
        ("float", "ue8m0"), "how the engines round activation scales; the weight scales are read as float32 either way"
    ),
    "expert_dtype": _one_of(("fp8",), "FP4-packed experts are not dequantized"),
    "modules_to_convert": _one_of(([],), "FP8 embeddings are not dequantized"),
    "modules_to_not_convert": _module_names,  # the modules stored unquantized: each tensor's dtype says so too
    "ignored_layers": _module_names,  # vLLM's and MiniMax's name for modules_to_not_convert
    "dequantize": lambda value: None if isinstance(value, bool) else "expected true or false",  # transformers' load flag
    # an FP8 KV cache, as SGLang reads it (and dist_quant exports it): its K/V scales are not read (`kv_cache`)
    "kv_cache_quant_algo": _one_of(("FP8",), "the cache's scales are calibrated anew; only an FP8 cache's are known"),
}


def quantization_problem(value) -> str | None:
    """Why a checkpoint with this quantization_config cannot be read, or None: an FP8 block-scaled one can
    (FP8_SOURCE_KEYS); any other is quantized already in a form dist_quant does not dequantize."""
    if not isinstance(value, dict):
        return "expected an object"
    method = value.get("quant_method")
    if method != "fp8":
        return (
            f"quant_method {method!r}: the checkpoint is already quantized in a form dist_quant does not dequantize "
            "(it reads FP8 block-scaled ones); calibrate its unquantized source"
        )
    if value.get("weight_block_size") is None:
        return (
            "quant_method 'fp8' without weight_block_size: the checkpoint is already quantized per tensor, which "
            "dist_quant does not dequantize (it reads FP8 block-scaled ones); calibrate its unquantized source"
        )
    for key, item in value.items():
        check = FP8_SOURCE_KEYS.get(key)
        if check is None:
            return f"{key} = {_short(item)}: not a key of FP8 block-scaled checkpoints dist_quant knows"
        problem = None if item is None else check(item)
        if problem:
            return f"{key} = {_short(item)}: {problem}"
    return None


# Keys every architecture accepts: identity, bookkeeping, tokens, output flags, training-only settings.
COMMON = {
    "architectures": Rule("read: picks the bridge"),
    "model_type": inert("the bridge is chosen by architectures"),
    "transformers_version": inert("bookkeeping"),
    "_name_or_path": inert("bookkeeping"),
    "bos_token_id": inert("token ids matter to tokenizers and generation only"),
    "eos_token_id": inert("token ids matter to tokenizers and generation only"),
    "pad_token_id": inert("token ids matter to tokenizers and generation only"),
    "use_cache": inert("KV caching during generation"),
    "initializer_range": inert("random initialization only"),
    "attention_dropout": inert("dropout is off in evaluation"),
    "output_attentions": inert("what transformers returns, not what it computes"),
    "output_hidden_states": inert("what transformers returns, not what it computes"),
    "return_dict": inert("what transformers returns, not what it computes"),
    "id2label": inert("labels of classification heads"),
    "label2id": inert("labels of classification heads"),
    "problem_type": inert("for classification heads"),
    "tokenizer_class": inert("the tokenizer's, not the model's"),
    "is_encoder_decoder": only((False,), "encoder-decoder models are not implemented"),
    "chunk_size_feed_forward": only((0,), "chunked feed-forward is not implemented"),
    "dtype": Rule("read: the compute dtype by default, and the dtype of unquantized exported tensors", _dtype),
    "torch_dtype": Rule("read: as dtype (transformers 4 name)", _dtype),
    "vocab_size": used(int, "an integer", positive=True),
    "hidden_size": used(int, "an integer", positive=True),
    "num_hidden_layers": used(int, "an integer", positive=True, at_most=MAX_COUNT),
    "num_attention_heads": used(int, "an integer", positive=True, relation=_head_size("num_attention_heads")),
    "num_key_value_heads": used((int, type(None)), "an integer (query groups)", positive=True, relation=_query_groups),
    "head_dim": used((int, type(None)), "an integer (per-head size)", positive=True, relation=_head_size("head_dim")),
    "max_position_embeddings": used(int, "an integer", positive=True),
    "rms_norm_eps": used((float, int), "a number", positive=True),
    "tie_word_embeddings": used(bool, "true or false"),
    "attention_bias": used(bool, "true or false (q/k/v/o biases)"),
    "hidden_act": only(("silu",), "only the SiLU-gated MLP is implemented"),
    "rope_scaling": Rule("read: rope type and parameters (transformers 4 name; wins, as in transformers)", rope_check("rope_scaling")),
    "rope_parameters": Rule("read: rope type and parameters", rope_check("rope_parameters")),
    "rope_theta": Rule("read: the rope base, unless the rope parameters give one", rope_check("rope_theta")),
    "quantization_config": Rule(
        "read: an FP8 block-scaled checkpoint (quant_method 'fp8' with weight_block_size) is dequantized on load; "
        "other quantized checkpoints are refused", lambda value, config, seq_len: quantization_problem(value)
    ),
    "auto_map": refused("the checkpoint ships its own modeling code, which dist_quant does not run"),
}


class HFConfig:
    """A config.json read through an architecture's key table."""

    def __init__(self, raw: dict, table: dict[str, Rule], architecture: str, partial_rotary: bool = False):
        self.raw = raw
        self.table = table
        self.architecture = architecture
        self.partial_rotary = partial_rotary
        self.rope = RopeSpec.from_config(raw)

    def __contains__(self, key: str) -> bool:
        return key in self.raw

    def get(self, key: str, default=None):
        value = self.raw.get(key)
        return default if value is None else value

    def require(self, key: str):
        value = self.raw.get(key)
        if value is None:
            raise BridgeError(f"config.json lacks {key!r}, which {self.architecture} needs")
        return value

    @property
    def dtype(self) -> torch.dtype:
        """The checkpoint's dtype (`dtype`, or `torch_dtype` as transformers 4 wrote it); float32 where absent."""
        return DTYPES[self.raw.get("dtype") or self.raw.get("torch_dtype") or "float32"]

    @property
    def fp8_block(self) -> tuple[int, int] | None:
        """The rows and columns of a weight block of an FP8 block-scaled checkpoint (its quantization_config, once
        validated); None for an unquantized one."""
        quantization = self.raw.get("quantization_config")
        return tuple(quantization["weight_block_size"]) if quantization else None

    @property
    def fp8_kv_cache(self) -> bool:
        """Whether an FP8 block-scaled checkpoint also holds FP8 KV cache scales (kv_cache_quant_algo)."""
        return bool((self.raw.get("quantization_config") or {}).get("kv_cache_quant_algo"))

    def validate(self, seq_len: int | None = None) -> None:
        """Raise BridgeError, one line, at the first key that is unknown or whose value cannot be honoured.
        `seq_len`: the longest sequence that will be run, for keys that act only beyond some length."""
        for key, value in self.raw.items():
            rule = self.table.get(key)
            if rule is None:
                raise BridgeError(
                    f"config.json: {key} = {_short(value)}: not a key the {self.architecture} bridge knows, so "
                    "dist_quant cannot vouch that the forward ignores it"
                )
            problem = None if value is None else rule.problem(value, self, seq_len)  # null: as if absent
            if problem:
                raise BridgeError(f"config.json: {key} = {_short(value)}: {problem}")
        for key, value in self.raw.items():
            problem = None if value is None else self.table[key].related_problem(value, self, seq_len)
            if problem:
                raise BridgeError(f"config.json: {key} = {_short(value)}: {problem}")


def _short(value) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list)) else repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
