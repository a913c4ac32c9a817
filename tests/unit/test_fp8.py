"""FP8 E4M3 numerics against the independent reference of docs/formats.md (tests/reference/formats.py); fake
quant through the dispatcher, torch reference and Triton kernel alike (the `backend` fixture; per-channel amax
always take the reference)."""

import pytest
import torch

from dist_quant.kernels.block_formats import fp8_fake_quant
from dist_quant.numerics import cast_e4m3, fp8_quantize, fp8_scale
from tests.reference import formats as ref
from tests.reference.data import DTYPES, spread


def test_cast_rounds_like_the_table_at_every_midpoint_and_past_the_range(gen):
    table = ref.E4M3_TABLE
    midpoints = (table[1:] + table[:-1]) / 2  # exact in float32: ties between neighbouring codes
    probes = torch.cat([table, midpoints, midpoints.nextafter(torch.tensor(0.0, dtype=torch.float64))])
    probes = torch.cat([probes, torch.tensor([460.0, 479.0, 480.0, 1e6, 2.0**-11, 2.0**-10])]).float()
    probes = torch.cat([probes, -probes, spread(gen, (4096,))])
    ref.assert_same_bits(cast_e4m3(probes).float(), ref.e4m3_round(probes))


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_tensor_fake_quant_matches_reference(backend, gen, dtype):
    x = spread(gen, (64, 96), dtype)
    x[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    x[1, :3] = torch.tensor([-1e-30, 1e-30, 0.0])  # underflow to a signed zero
    amax = x[2:].float().abs().max()
    for amax in (amax, amax * 0.3, amax * 1e-20):  # the second one clamps, the third one a subnormal scale
        ref.assert_same_bits(fp8_fake_quant(x, amax), ref.fp8_fake_quant(x, amax))
    ref.assert_same_bits(fp8_fake_quant(x, 0.0), ref.fp8_fake_quant(x, torch.tensor(0.0)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_channel_fake_quant_matches_reference(backend, gen, dtype):
    x = spread(gen, (48, 80), dtype)
    amax = x.float().abs().amax(dim=1, keepdim=True) * torch.rand(48, 1, generator=gen).add(0.5)
    amax[3] = 0.0
    ref.assert_same_bits(fp8_fake_quant(x, amax), ref.fp8_fake_quant(x, amax))


def test_values_in_the_e4m3_subnormal_range(backend, gen):
    amax = torch.tensor(448.0)  # scale 1: x lands on the E4M3 grid directly
    x = torch.rand(1024, generator=gen) * 2.0**-5 * torch.randn(1024, generator=gen).sign()
    y = fp8_fake_quant(x, amax)
    ref.assert_same_bits(y, ref.fp8_fake_quant(x, amax))
    assert (y.abs() < 2.0**-6).sum() > 100 and (y.abs() * 2**9 == (y.abs() * 2**9).round()).all()


def test_zero_amax_keeps_zeros_and_positive_scale(backend):
    x = torch.zeros(4, 16)
    q, scale = fp8_quantize(x, torch.tensor(0.0))
    assert scale == torch.tensor(1.0) / 448 and torch.equal(fp8_fake_quant(x, torch.tensor(0.0)), x)
    assert not q.float().isnan().any()


def test_nan_propagates_and_inf_saturates_to_amax(backend):
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0, 1e9])
    y = fp8_fake_quant(x, torch.tensor(2.0))
    assert y[0].isnan() and y[1] == 2.0 and y[2] == -2.0 and y[4] == 2.0
    ref.assert_same_bits(y, ref.fp8_fake_quant(x, torch.tensor(2.0)))


def test_quantize_then_scale_is_the_fake_quant(backend, gen):
    x = spread(gen, (32, 64), torch.bfloat16)
    amax = x.float().abs().max()
    q, scale = fp8_quantize(x, amax)
    assert q.dtype == torch.float8_e4m3fn and scale == fp8_scale(amax) == amax / 448
    ref.assert_same_bits((q.float() * scale).to(x.dtype), fp8_fake_quant(x, amax))


def test_rejects_non_float_input(backend):
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        fp8_fake_quant(torch.ones(4, dtype=torch.int32), 1.0)
