"""Rotary position embeddings as a Hugging Face config.json describes them (`rope_parameters`, or the older
`rope_scaling` + `rope_theta`), reduced to what a forward needs: the inverse frequencies and the attention factor
that multiplies cos and sin. Every rope type is either computed exactly as transformers and the serving engines
compute it, or refused with the reason (see `RopeSpec.problem`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# Sub-keys each implemented rope type understands; anything else in the dict is refused by name.
_PARAMETERS = {
    "default": {"rope_type", "type", "rope_theta", "partial_rotary_factor"},
    "linear": {"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor"},
    "llama3": {
        "rope_type", "type", "rope_theta", "partial_rotary_factor", "factor", "low_freq_factor", "high_freq_factor",
        "original_max_position_embeddings",
    },
    "yarn": {
        "rope_type", "type", "rope_theta", "partial_rotary_factor", "factor", "original_max_position_embeddings",
        "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate",
    },
}
# Numeric parameters: those divided by or whose logarithm is taken must be above 0 (beta_fast and beta_slow may be
# 0, which stands for their defaults as in transformers); the others finite.
_ABOVE_ZERO = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings", "attention_factor")
_AT_LEAST_ZERO = ("beta_fast", "beta_slow")
_FINITE = ("mscale", "mscale_all_dim")
_REFUSED = {
    "dynamic": "dynamic NTK scaling: transformers keeps the plain base up to max_position_embeddings while vLLM "
    "always uses the scaled base, so no calibration matches both",
    "longrope": "LongRoPE switches its factors with the sequence length (Phi-3 models); not implemented",
}


@dataclass(frozen=True)
class RopeSpec:
    rope_type: str
    theta: float
    params: dict = field(default_factory=dict)
    max_position_embeddings: int = 0
    # A top-level `original_max_position_embeddings` (Phi-3 style) wins over the one inside the rope dict.
    original_max_position_embeddings: int | None = None
    partial_rotary_factor: float = 1.0  # the rotated part of each head

    @classmethod
    def from_config(cls, config: dict) -> "RopeSpec":
        params = config.get("rope_scaling") or config.get("rope_parameters") or {}  # transformers' priority
        if not isinstance(params, dict):
            params = {"rope_type": params}  # refused below with its value
        rope_type = params.get("rope_type", params.get("type", "default"))
        theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
        return cls(
            rope_type, theta, dict(params), config.get("max_position_embeddings", 0),
            config.get("original_max_position_embeddings"),
            params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)),
        )

    def problem(self, partial_rotary: bool = False) -> str | None:
        """Why this rope cannot be computed exactly; None when it can. `partial_rotary`: whether the
        architecture's transformers code rotates part of each head only."""
        if self.rope_type in _REFUSED:
            return f"rope_type {self.rope_type!r} is refused: {_REFUSED[self.rope_type]}"
        if self.rope_type not in _PARAMETERS:
            return f"rope_type {self.rope_type!r} is not implemented (implemented: {', '.join(_PARAMETERS)})"
        unknown = sorted(set(self.params) - _PARAMETERS[self.rope_type])
        if unknown:
            return f"{unknown[0]} = {self.params[unknown[0]]!r} is not understood for rope_type {self.rope_type!r}"
        numbers = dict(self.params)
        if self.rope_type in ("llama3", "yarn"):  # the types that read the original length
            numbers["original_max_position_embeddings"] = self._original_length()
        for name, number in numbers.items():
            if name not in (*_ABOVE_ZERO, *_AT_LEAST_ZERO, *_FINITE) or number is None:
                continue
            if not _finite_number(number):
                return f"{name} = {number!r} must be a finite number"
            if name in _ABOVE_ZERO and number <= 0 or name in _AT_LEAST_ZERO and number < 0:
                return f"{name} = {number!r} must be {'above 0' if name in _ABOVE_ZERO else '0 or more'}"
        fraction = self.partial_rotary_factor
        if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            return f"partial_rotary_factor = {fraction!r} must be a number in (0, 1]"
        if fraction != 1.0 and not partial_rotary:
            return f"partial_rotary_factor = {fraction} (partial rotary) is not what this architecture computes"
        if not _finite_number(self.theta) or not self.theta > 1:
            return f"rope_theta = {self.theta!r} must be a finite number above 1"
        needed = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}
        for name in needed.get(self.rope_type, ()):
            if not isinstance(self.params.get(name), (int, float)):
                return f"rope_type {self.rope_type!r} needs a number {name}, got {self.params.get(name)!r}"
        if self.rope_type == "yarn" and self.params.get("attention_factor") is not None:
            derived = _yarn_attention_factor(self._yarn_factor(), self.params.get("mscale"), self.params.get("mscale_all_dim"))
            if self.params["attention_factor"] != derived:
                return (
                    f"attention_factor = {self.params['attention_factor']} differs from the one yarn derives "
                    f"({derived}); an explicit attention factor is not implemented"
                )
        return None

    # -- the numbers ---------------------------------------------------------------------------------------
    def _original_length(self) -> int:
        if self.original_max_position_embeddings is not None:
            return self.original_max_position_embeddings
        return self.params.get("original_max_position_embeddings") or self.max_position_embeddings

    def _yarn_factor(self) -> float:
        factor = self.params.get("factor")
        return self.max_position_embeddings / self._original_length() if factor is None else factor

    def rotary_dim(self, head_dim: int) -> int:
        """How many channels of each head rotate (the first ones)."""
        return int(head_dim * self.partial_rotary_factor)

    def inv_freq(self, head_dim: int) -> torch.Tensor:
        """Inverse frequencies [rotary dim / 2], float32, computed as transformers computes them."""
        head_dim = self.rotary_dim(head_dim)
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        base = self.theta ** exponents
        plain = 1.0 / base
        if self.rope_type == "linear":
            return plain / self.params["factor"]
        if self.rope_type == "llama3":
            return _llama3(plain, self.params, self._original_length())
        if self.rope_type == "yarn":
            return _yarn(base, self._yarn_factor(), self.params, head_dim, self.theta, self._original_length())
        return plain

    def attention_factor(self) -> float:
        """What cos and sin are multiplied by (yarn's "mscale"); 1 for the other types."""
        if self.rope_type != "yarn":
            return 1.0
        return _yarn_attention_factor(self._yarn_factor(), self.params.get("mscale"), self.params.get("mscale_all_dim"))

    def latent_softmax_scale(self, qk_head_dim: int) -> float:
        """The attention's softmax scale in DeepSeek's multi-latent attention, as transformers and vLLM compute
        it: qk_head_dim^-1/2, times mscale(factor, mscale_all_dim)^2 where a yarn rope sets mscale_all_dim (the
        long-context scores' temperature; cos and sin carry mscale / mscale_all_dim besides)."""
        scale = qk_head_dim ** (-0.5)
        mscale_all_dim = self.params.get("mscale_all_dim") if self.rope_type == "yarn" else None
        if mscale_all_dim:
            mscale = _mscale(self._yarn_factor(), mscale_all_dim)
            scale = scale * mscale * mscale
        return scale

    def megatron_attributes(self) -> dict:
        """Attributes megatron-core reads off its TransformerConfig for the factor it multiplies cos and sin by
        (`_yarn_get_concentration_factor_from_config`): the same formula as transformers' for yarn."""
        if self.rope_type != "yarn" or self.attention_factor() == 1.0:
            return {}
        mscale, mscale_all_dim = self.params.get("mscale"), self.params.get("mscale_all_dim")
        both = bool(mscale and mscale_all_dim)  # transformers ignores them unless both are set and non-zero
        return {
            "yarn_rotary_scaling_factor": self._yarn_factor(),
            "yarn_mscale": mscale if both else None,
            "yarn_mscale_all_dim": mscale_all_dim if both else None,
        }


def _finite_number(value) -> bool:
    """A number a float holds: not a bool, NaN or infinity, nor an integer beyond float's range (JSON's are not)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_attention_factor(factor: float, mscale, mscale_all_dim) -> float:
    if mscale and mscale_all_dim:
        return float(_mscale(factor, mscale) / _mscale(factor, mscale_all_dim))
    return _mscale(factor)


def _llama3(inv_freq: torch.Tensor, params: dict, original: int) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth blend in between."""
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < original / high) * ~(wavelen > original / low)
    return torch.where(medium, blended, scaled)


def _yarn(base: torch.Tensor, factor: float, params: dict, dim: int, theta: float, original: int) -> torch.Tensor:
    """YaRN: interpolated (divided by factor) below a band of dimensions, extrapolated above, a ramp between."""
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def dimension(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = dimension(beta_fast), dimension(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    return (1.0 / (factor * base)) * (1 - extrapolation) + (1.0 / base) * extrapolation
