"""TensorQuantizer: a quantizer's state (amax buffers, format) plus its mode.

Buffers, all float32:
- `_amax`: the calibrated amax: a scalar, or [out, 1]-like for FP8 per-channel (`axis`). For NVFP4 this is the
  quantizer's own per-tensor amax.
- `_global_amax` (NVFP4): set only by a shared quant state (q/k/v, gate/up siblings): the group's max, used for
  `scale_2` instead of the own `_amax` (see `global_amax`).
- `_block_amax` (NVFP4 with static blocks): per-block amax [..., n/16], from max or MSE calibration.
Buffers are absent until calibrated, and `load_state_dict` adopts whatever shapes the checkpoint holds. `_amax`
may be a view into a flat buffer shared with other quantizers (`bind_amax`), so that a distributed sync is one
all-reduce; calibration writes into it in place.
"""

from __future__ import annotations

import enum
import math
import operator
from typing import Sequence

import torch
from torch import nn

from dist_quant.formats import STATIC, QuantFormat
from dist_quant.kernels import update_amax_, update_segment_amax_
from dist_quant.numerics.amax import tensor_amax

AMAX_BUFFERS = ("_amax", "_global_amax", "_block_amax")


class QuantizerMode(enum.Enum):
    DISABLED = "disabled"  # identity, no statistics
    CALIBRATING = "calibrating"  # identity, statistics collected
    QUANTIZING = "quantizing"  # fake quantization, straight-through gradient


_settings_generation = 0


def settings_generation() -> int:
    """How many times, in this process, a quantizer's mode or output caching changed or a calibrator was reset:
    what keeps work decided per group of quantizers (an MoE layer's experts, `SegmentAmax`) valid between
    changes, instead of asking every quantizer in every forward."""
    return _settings_generation


def _settings_changed() -> None:
    global _settings_generation
    _settings_generation += 1


def _running_max(current: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    return new if current is None else torch.maximum(current, new, out=current)


class MaxCalibrator:
    """Running max of |x| at the quantizer's granularities: per tensor (or channel), and per block if static."""

    def __init__(self, fmt: QuantFormat):
        self.fmt = fmt
        self.reset()

    def reset(self) -> None:
        self.amax: torch.Tensor | None = None
        self.block_amax: torch.Tensor | None = None
        _settings_changed()

    def collect(self, x: torch.Tensor) -> None:
        if x.numel() == 0:  # e.g. an expert that received no tokens: no data, not a zero amax
            return
        x = x.detach()
        if self.fmt.axis is None:
            if self.amax is None:
                self.amax = tensor_amax(x)
            else:  # in place, one launch on CUDA (the amax may be a view of an `SegmentAmax`'s running max)
                update_amax_(self.amax, x)
        else:
            axis = self.fmt.axis % x.dim()
            amax = x.abs().amax(dim=[d for d in range(x.dim()) if d != axis], keepdim=True).float()
            self.amax = _running_max(self.amax, amax)
        if self.fmt.block_type == STATIC:
            self.block_amax = _running_max(self.block_amax, self.fmt.number.block_amax(x))


class _StraightThrough(torch.autograd.Function):
    """Fake quant forward; identity gradient where |x| <= bound (inside the clamp range), zero outside."""

    @staticmethod
    def forward(ctx, x, bound, fake_quant):
        ctx.save_for_backward(x, bound)
        return fake_quant(x)

    @staticmethod
    def backward(ctx, grad):
        x, bound = ctx.saved_tensors
        return grad * (x.abs() <= bound), None, None


def _short(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa.rstrip('0')}{'0' if mantissa.endswith('.00') else ''}e{exponent}"


def _summarize(t: torch.Tensor | None) -> str:
    if t is None:
        return "None"
    if t.numel() == 1:
        return _short(t.item())
    return f"[{_short(t.min().item())}, {_short(t.max().item())}]"


_PROPERTIES = frozenset({"mode", "cache_output"})
_PLAIN_ATTRIBUTES = frozenset({"_mode", "_cache_output", "_cache", "saw_data"})


class TensorQuantizer(nn.Module):
    """Fake-quantizes one tensor (a weight, an input, K or V). `fmt` None = disabled by the recipe."""

    def __init__(self, fmt: QuantFormat | None = None):
        super().__init__()
        self.fmt = fmt
        self._mode = QuantizerMode.DISABLED
        self.__dict__["shared_state"] = None  # the SharedQuantState of its siblings, if any; not a submodule
        self._cache_output = False
        self.saw_data = False  # whether the last calibration got any element (an amax of 0 may mean all zeros)
        self._cache: tuple | None = None
        for name in AMAX_BUFFERS:
            self.register_buffer(name, None)
        self.calibrator = MaxCalibrator(fmt) if fmt is not None and not fmt.use_constant_amax else None
        if fmt is not None and fmt.use_constant_amax:
            self._set_amax(torch.tensor(fmt.number.largest))

    def __setattr__(self, name: str, value) -> None:
        # Plain attributes and the setters of `mode` and `cache_output` bypass nn.Module's setattr, whose checks
        # (parameter? buffer? module?) cost more than the rest when a calibration sets 25,000 quantizers' modes.
        if name in _PROPERTIES:
            object.__setattr__(self, name, value)
        elif name in _PLAIN_ATTRIBUTES:
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)

    @property
    def enabled(self) -> bool:
        return self.fmt is not None

    @property
    def is_calibrated(self) -> bool:
        return self._amax is not None and (self.fmt.block_type != STATIC or self._block_amax is not None)

    @property
    def mode(self) -> QuantizerMode:
        return self._mode

    @mode.setter
    def mode(self, mode: QuantizerMode) -> None:
        if mode is not QuantizerMode.DISABLED and not self.enabled:
            raise ValueError("a quantizer disabled by the recipe can only be in mode DISABLED")
        if mode is QuantizerMode.QUANTIZING and not self.is_calibrated:
            raise ValueError("cannot quantize before calibration: this quantizer has no amax")
        if mode is QuantizerMode.CALIBRATING and self.calibrator is not None:
            self.calibrator.reset()
        self._mode = mode
        _settings_changed()

    @property
    def cache_output(self) -> bool:
        """Whether the fake-quant output is kept while its input and amax stay the same (see
        `cache_fake_quant_weights`)."""
        return self._cache_output

    @cache_output.setter
    def cache_output(self, enabled: bool) -> None:
        self._cache_output = enabled
        _settings_changed()

    @property
    def global_amax(self) -> torch.Tensor | None:
        """NVFP4's per-tensor amax behind scale_2: the shared state's value if set, else the own amax."""
        return self._amax if self._global_amax is None else self._global_amax

    def bind_amax(self, view: torch.Tensor) -> None:
        """Make `_amax` a view into a shared flat buffer (keeping its value), so a sync needs no copies."""
        amax = self._buffers["_amax"]
        if amax is not None:
            view.copy_(amax.reshape(view.shape))
        self._buffers["_amax"] = view  # nn.Module's setattr, per quantizer of a 30B MoE, costs more than the rest

    def _set_amax(self, amax: torch.Tensor, block_amax: torch.Tensor | None = None) -> None:
        if self._amax is not None and self._amax.shape == amax.shape:
            self._amax.copy_(amax)  # keeps a bound view bound
        else:  # a copy: a calibrator's amax may be a view of a running max that goes on (SegmentAmax)
            self._amax = amax.to(torch.float32, copy=True)
        if block_amax is not None:
            self._block_amax = block_amax.float()

    def finish_calibration(self) -> bool:
        """Turn collected statistics into amax buffers. -> False when this quantizer saw no data. NaN or Inf in
        the data lands in the amax; the driver checks (collectively, so no rank waits on one that raised)."""
        finish_calibrations([self])
        return self.calibrator is None or self.saw_data

    def calibrate_from(self, tensor: torch.Tensor) -> None:
        """Calibrate from one tensor, e.g. a weight: no forward pass needed."""
        if self.calibrator is None:
            return
        self.calibrator.reset()
        self.calibrator.collect(tensor)
        self.finish_calibration()

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """x quantized and dequantized with the calibrated state (no mode, no gradient rule)."""
        block_amax = self._block_amax if self.fmt.block_type == STATIC else None
        return self.fmt.number.fake_quant(self.fmt, x, self._amax, self._global_amax, block_amax)

    def clamp_bound(self) -> torch.Tensor:
        return self.fmt.number.clamp_bound(self._amax, self._global_amax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._mode is QuantizerMode.DISABLED or x.numel() == 0:
            return x
        if self._mode is QuantizerMode.CALIBRATING:
            if self.calibrator is not None:
                self.calibrator.collect(x)
            return x
        if self._amax.device != x.device:
            self.to(x.device)  # buffers restored from a checkpoint before the model moved
        if x.requires_grad and torch.is_grad_enabled():
            return _StraightThrough.apply(x, self.clamp_bound(), self.fake_quant)
        if self._cache_output:
            # Same tensor, unchanged (version counters), same amax: the fake-quant result is the same.
            key = (x.data_ptr(), x._version, *(b._version for b in (self._amax, self._global_amax, self._block_amax) if b is not None))
            if self._cache is None or self._cache[0] != key:
                self._cache = (key, self.fake_quant(x))
            return self._cache[1]
        return self.fake_quant(x)

    def buffer_shape(self, buffer: str, weight: torch.Tensor | None = None) -> torch.Size | None:
        """The shape a calibrated buffer (one of AMAX_BUFFERS) of this quantizer has, for the tensor it quantizes
        (`weight`, or an activation: None); None where this quantizer keeps no such buffer."""
        return None if self.fmt is None else self.fmt.number.buffer_shapes(self.fmt, weight).get(buffer)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Adopt the checkpoint's buffers whatever their shape: amax shapes are only known after calibration.
        for name in AMAX_BUFFERS:
            saved = state_dict.get(prefix + name)
            if saved is not None:
                setattr(self, name, torch.empty_like(saved, dtype=torch.float32))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        if not self.enabled:
            return "disabled"
        text = f"{self.fmt.describe()} amax={_summarize(self._amax)}"
        if self.fmt.use_constant_amax:
            text += "(const)"
        if self._global_amax is not None:
            text += f" global_amax={_summarize(self._global_amax)}(shared)"
        if self._mode is not QuantizerMode.QUANTIZING:
            text += f" {self._mode.value}"
        return text


def finish_calibrations(quantizers: Sequence[TensorQuantizer]) -> None:
    """`finish_calibration` of each quantizer (`saw_data` says which saw none), the amax of those whose buffer
    has the right shape already (bound to a flat buffer: every calibration's case) copied in one multi-tensor
    launch rather than one copy each."""
    targets, sources = [], []
    for q in quantizers:
        calibrator = q.calibrator
        if calibrator is None:
            continue
        collected, block_amax = calibrator.amax, calibrator.block_amax
        calibrator.reset()
        q.saw_data = collected is not None
        if collected is None:
            continue
        amax = q._buffers["_amax"]
        if block_amax is None and amax is not None and amax.shape == collected.shape:
            targets.append(amax)
            sources.append(collected)
        else:
            q._set_amax(collected, block_amax)
    if targets:
        torch._foreach_copy_(targets, sources)


def segments_calibrate_together(quantizers: Sequence[TensorQuantizer]) -> bool:
    """Whether these quantizers (all of one format), fed consecutive row segments of one tensor, can collect
    their statistics in one pass (`SegmentAmax`): all calibrating, max calibration of a per-tensor amax."""
    first = quantizers[0]
    if any(q._mode is not QuantizerMode.CALIBRATING for q in quantizers):
        return False
    return first.calibrator is not None and first.fmt.axis is None and first.fmt.block_type != STATIC


def segments_quantize_together(quantizers: Sequence[TensorQuantizer]) -> bool:
    """Whether these quantizers (all of one format), fed consecutive row segments of one tensor, can
    fake-quantize them in one launch (`fake_quant_segments`): all quantizing, in a format that does (NVFP4), no
    cached output."""
    if any(q._mode is not QuantizerMode.QUANTIZING or q._cache_output for q in quantizers):
        return False
    return quantizers[0].fmt.number.segmented


def fake_quant_segments(
    quantizers: Sequence[TensorQuantizer], x: torch.Tensor, rows: Sequence[int], row_ends: torch.Tensor | None = None
) -> torch.Tensor:
    """x [sum(rows), n] with each segment of rows fake-quantized by its quantizer (see
    `segments_quantize_together`): the same values as one call per quantizer, in one kernel launch, and under
    autograd the same straight-through gradient (each row bounded by its quantizer's clamp bound). `row_ends`:
    `rows` as cumulative counts on x's device (int32), where the caller has them (an MoE layer's token offsets)."""
    number = quantizers[0].fmt.number
    # the buffers read from each quantizer's dict: nn.Module's attribute lookup costs ten times more, per expert
    buffers = [q._buffers for q in quantizers]
    global_amax = _stacked_amax(quantizers[0], [b["_amax"] if b["_global_amax"] is None else b["_global_amax"] for b in buffers])
    block_amax = None
    if quantizers[0].fmt.block_type == STATIC:
        blocks = x.shape[1] // number.block
        block_amax = torch.cat([b["_block_amax"].reshape(n, blocks) for b, n in zip(buffers, rows)]).to(x.device)

    def fake_quant(x):
        return number.fake_quant_segments(x, global_amax, rows, block_amax, row_ends)

    if not (x.requires_grad and torch.is_grad_enabled()):
        return fake_quant(x)
    amax = torch.stack([b["_amax"] for b in buffers]).reshape(len(quantizers))
    bounds = number.clamp_bound(amax, global_amax).to(x.device)
    counts = torch.tensor(rows).to(x.device, non_blocking=True)
    return _StraightThrough.apply(x, bounds.repeat_interleave(counts, output_size=len(x)).unsqueeze(1), fake_quant)


def _stacked_amax(first: TensorQuantizer, amax: list[torch.Tensor]) -> torch.Tensor:
    """The per-tensor amax of a role's quantizers as one [quantizers] tensor, kept with the first quantizer while
    every one of them is the same tensor at the same version (stacking 128 scalars costs 300 us of host time, in
    every layer's every forward). Calibrated amax are views of one flat buffer (`bind_amax`), which share its
    version counter: then one version tells whether any of them was written since."""
    kept = first.__dict__.get("_stacked_segment_amax")
    if kept is not None:
        tensors, versions, stacked, shared = kept
        if len(tensors) == len(amax) and all(map(operator.is_, amax, tensors)) and versions == _versions(amax, shared):
            return stacked
    base = amax[0]._base
    shared = base is not None and all(t._base is base for t in amax)
    versions = _versions(amax, shared)
    # the tensors held too, so that no other tensor can take one's place while it is kept
    first.__dict__["_stacked_segment_amax"] = (amax, versions, torch.stack(amax).reshape(len(amax)), shared)  # a plain attribute: no state
    return first.__dict__["_stacked_segment_amax"][2]


def _versions(amax: list[torch.Tensor], shared: bool) -> int | list[int]:
    """What `_stacked_amax` compares: the one version counter views of one buffer share, or each tensor's."""
    return amax[0]._version if shared else list(map(_VERSION, amax))


_VERSION = operator.attrgetter("_version")


class SegmentAmax:
    """Max calibration of quantizers that see consecutive row segments of one tensor (the experts of an MoE
    layer) in one launch per forward on CUDA, however many segments (`kernels.update_segment_amax_`): one
    running max of all segments, whose element e is calibrator e's amax (a view) once segment e had rows. No
    host-device transfer: the segment lengths and their sums come as tensors on x's device too."""

    def __init__(self, quantizers: Sequence[TensorQuantizer]):
        self.calibrators = [q.calibrator for q in quantizers]
        self.running: torch.Tensor | None = None
        self.views: list[torch.Tensor | None] = [None] * len(quantizers)  # the running max's elements handed out
        # the settings generation at which every calibrator held its view: until a calibrator is reset, a
        # forward has nothing to hand out and asks none of them
        self.all_joined = -1

    def collect(self, x: torch.Tensor, counts: list[int], lengths: torch.Tensor, row_ends: torch.Tensor) -> None:
        """x's rows, `counts[e]` for segment e, one after another; `lengths` the same on x's device, `row_ends`
        their cumulative sums (int32)."""
        if not len(x):
            return
        if self.all_joined != settings_generation():
            self._join(counts, x.device)
        # NaN propagates, as in the per-tensor max; a segment without rows gives 0, below any amax
        update_segment_amax_(self.running, x.detach(), lengths, row_ends)

    def _join(self, counts: list[int], device: torch.device) -> None:
        """Hand each calibrator whose segment has rows, and that does not hold it yet, its element of the
        running max (a segment without rows is no data, not an amax of 0)."""
        calibrators, views = self.calibrators, self.views
        joining = [e for e, n in enumerate(counts) if n and (calibrators[e].amax is None or calibrators[e].amax is not views[e])]
        if joining:
            if self.running is None or not any(c.amax is not None and c.amax is v for c, v in zip(calibrators, views)):
                # a new calibration: what calibrators kept is their own
                self.running = torch.zeros(len(counts), dtype=torch.float32, device=device)
            else:
                self.running[torch.tensor(joining, device=device)] = 0.0
            for e in joining:
                if calibrators[e].amax is not None:  # collected on its own before (MaxCalibrator): kept
                    self.running[e] = calibrators[e].amax
            for e in joining:
                calibrators[e].amax = views[e] = self.running[e]
        if all(v is not None and c.amax is v for c, v in zip(calibrators, views)):
            self.all_joined = settings_generation()
