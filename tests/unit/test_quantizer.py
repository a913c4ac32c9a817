"""TensorQuantizer: modes, max calibration at each granularity, constant amax, STE, repr, state_dict."""

import pytest
import torch

from dist_quant.numerics import fp8_fake_quant, nvfp4_fake_quant
from dist_quant.formats import DYNAMIC, FP8, NVFP4, STATIC, QuantFormat
from dist_quant.quantizer import QuantizerMode, TensorQuantizer
from tests.reference.data import spread

FP8_TENSOR = QuantFormat(FP8)
FP8_CHANNEL = QuantFormat(FP8, axis=0)
NVFP4_DYNAMIC = QuantFormat(NVFP4, block_type=DYNAMIC)
NVFP4_STATIC = QuantFormat(NVFP4, block_type=STATIC)


def _calibrated(fmt, batches):
    q = TensorQuantizer(fmt)
    q.mode = QuantizerMode.CALIBRATING
    for x in batches:
        assert q(x) is x  # calibrating is the identity
    assert q.finish_calibration()
    q.mode = QuantizerMode.QUANTIZING
    return q


def test_max_calibration_per_tensor_is_the_max_over_batches(gen):
    batches = [spread(gen, (8, 32)) for _ in range(4)]
    q = _calibrated(FP8_TENSOR, batches)
    assert q._amax == max(b.abs().max() for b in batches)
    assert torch.equal(q(batches[0]), fp8_fake_quant(batches[0], q._amax))


def test_max_calibration_per_channel(gen):
    batches = [spread(gen, (16, 32)) for _ in range(3)]
    q = _calibrated(FP8_CHANNEL, batches)
    expected = torch.stack([b.abs().amax(dim=1, keepdim=True) for b in batches]).amax(0)
    assert q._amax.shape == (16, 1) and torch.equal(q._amax, expected)


def test_max_calibration_per_block_for_static_nvfp4(gen):
    batches = [spread(gen, (4, 64)) for _ in range(3)]
    q = _calibrated(NVFP4_STATIC, batches)
    expected = torch.stack([b.abs().reshape(4, 4, 16).amax(-1) for b in batches]).amax(0)
    assert torch.equal(q._block_amax, expected) and q._block_amax.shape == (4, 4)
    assert q._global_amax is None and q.global_amax is q._amax
    assert torch.equal(q(batches[1]), nvfp4_fake_quant(batches[1], q._amax, expected))


def test_dynamic_nvfp4_uses_the_global_amax(gen):
    x = spread(gen, (8, 48), torch.bfloat16)
    q = _calibrated(NVFP4_DYNAMIC, [x])
    assert q._block_amax is None
    q._global_amax = q._amax * 2  # as a shared quant state would set it
    assert torch.equal(q(x), nvfp4_fake_quant(x, q._amax * 2))
    assert torch.equal(q.state_dict()["_global_amax"], q._amax * 2)


def test_constant_amax_is_never_calibrated(gen):
    q = TensorQuantizer(QuantFormat(FP8, use_constant_amax=True))
    assert q.is_calibrated and q._amax == 448.0
    q.mode = QuantizerMode.CALIBRATING
    q(spread(gen, (4, 16)) * 1e4)
    assert q.finish_calibration() and q._amax == 448.0
    nvfp4_cast = TensorQuantizer(QuantFormat(NVFP4, block_type=DYNAMIC, use_constant_amax=True))
    assert nvfp4_cast.global_amax == 448.0


def test_disabled_mode_is_identity_and_collects_nothing(gen):
    q = TensorQuantizer(FP8_TENSOR)
    x = spread(gen, (4, 16))
    assert q(x) is x and not q.finish_calibration() and q._amax is None


def test_empty_input_is_no_data(gen):
    q = TensorQuantizer(NVFP4_DYNAMIC)
    q.mode = QuantizerMode.CALIBRATING
    q(torch.empty(0, 32))
    assert not q.finish_calibration()
    q._set_amax(torch.tensor(1.0))
    q.mode = QuantizerMode.QUANTIZING
    assert q(torch.empty(0, 32)).shape == (0, 32)


def test_mode_errors():
    with pytest.raises(ValueError, match="no amax"):
        TensorQuantizer(FP8_TENSOR).mode = QuantizerMode.QUANTIZING
    with pytest.raises(ValueError, match="disabled by the recipe"):
        TensorQuantizer(None).mode = QuantizerMode.CALIBRATING


@pytest.mark.parametrize("fmt", [FP8_TENSOR, FP8_CHANNEL, NVFP4_DYNAMIC])
def test_straight_through_gradient_is_identity_inside_the_clamp_range(gen, fmt):
    x = spread(gen, (8, 32))
    q = _calibrated(fmt, [x])
    q._amax = q._amax * 0.5  # half the values now fall outside the clamp range
    x = x.clone().requires_grad_()
    upstream = torch.randn(x.shape, generator=gen)
    (q(x) * upstream).sum().backward()
    inside = x.detach().abs() <= q._amax
    assert inside.any() and (~inside).any()
    assert torch.equal(x.grad[inside], upstream[inside]) and (x.grad[~inside] == 0).all()


def test_repr_is_readable():
    q = TensorQuantizer(NVFP4_DYNAMIC)
    q._set_amax(torch.tensor(2.3))
    q.mode = QuantizerMode.QUANTIZING
    assert q.extra_repr() == "nvfp4 block16 amax=2.3e+00"
    q._global_amax = torch.tensor(4.0)
    assert q.extra_repr() == "nvfp4 block16 amax=2.3e+00 global_amax=4.0e+00(shared)"
    assert TensorQuantizer(QuantFormat(FP8, use_constant_amax=True)).extra_repr() == (
        "fp8 amax=4.48e+02(const) disabled"
    )
    channel = TensorQuantizer(FP8_CHANNEL)
    channel._set_amax(torch.tensor([[0.5], [3.0]]))
    assert channel.extra_repr() == "fp8 axis=0 amax=[5.0e-01, 3.0e+00] disabled"
    assert TensorQuantizer(None).extra_repr() == "disabled"


@pytest.mark.parametrize("fmt", [FP8_TENSOR, FP8_CHANNEL, NVFP4_DYNAMIC, NVFP4_STATIC])
def test_state_dict_round_trip_into_a_fresh_quantizer(gen, fmt):
    x = spread(gen, (8, 32))
    q = _calibrated(fmt, [x])
    fresh = TensorQuantizer(fmt)
    fresh.load_state_dict(q.state_dict(), strict=True)
    fresh.mode = QuantizerMode.QUANTIZING
    for name in ("_amax", "_global_amax", "_block_amax"):
        saved = getattr(q, name)
        assert (saved is None and getattr(fresh, name) is None) or torch.equal(getattr(fresh, name), saved)
    assert torch.equal(fresh(x), q(x))


def test_bound_amax_is_written_in_place(gen):
    arena = torch.zeros(3)
    q = TensorQuantizer(FP8_TENSOR)
    q.bind_amax(arena[1])
    q.calibrate_from(torch.tensor([-2.5, 1.0]))
    assert arena.tolist() == [0.0, 2.5, 0.0] and q._amax.data_ptr() == arena[1:].data_ptr()


def test_cached_output_follows_the_input_and_the_amax(gen):
    w = spread(gen, (8, 32))
    q = _calibrated(NVFP4_DYNAMIC, [w])
    q.cache_output = True
    with torch.no_grad():
        first = q(w)
        assert q(w) is first  # unchanged: served from the cache
        w.mul_(2.0)  # in place: the version counter moves
        assert torch.equal(q(w), nvfp4_fake_quant(w, q._amax))
        q._amax.mul_(2.0)
        assert torch.equal(q(w), nvfp4_fake_quant(w, q._amax))
    x = w.clone().requires_grad_()
    assert q(x) is not q._cache[1]  # training never reads the cache
