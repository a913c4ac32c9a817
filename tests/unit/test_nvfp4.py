"""NVFP4 numerics, torch reference and Triton kernels alike (the `backend` fixture runs both), bit for bit
against the independent reference of docs/formats.md (tests/reference/formats.py)."""

import pytest
import torch

from dist_quant.kernels import (
    nvfp4_dequantize,
    nvfp4_fake_quant,
    nvfp4_fake_quant_segments,
    nvfp4_quantize,
    nvfp4_quantize_segments,
    use_triton,
)
from tests.reference import formats as ref
from tests.reference.data import DTYPES, near_ties, spread

SHAPES = [(8, 64), (3, 5, 48), (37, 16), (300, 32)]  # block counts not multiples of the kernel's tile
NAN_SCALE_BYTES = (0x7F, 0xFF)


def _static_block_amax(gen, x):
    """Per-block amax from 0.3x (values above 6 x scale saturate) to 1.5x the true block max."""
    dynamic = ref.nvfp4(x, torch.tensor(1.0))["scale_codes"]  # only for its shape
    true_max = x.float().reshape(*dynamic.shape, 16).abs().amax(-1)
    return true_max * (torch.rand(dynamic.shape, generator=gen) * 1.2 + 0.3)


def test_backend_fixture_selects_the_kernel(backend):
    assert use_triton(torch.zeros(16)) == (backend == "triton")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocks", ["dynamic", "static"])
def test_fake_quant_matches_reference(backend, gen, dtype, shape, blocks):
    x = spread(gen, shape, dtype)
    global_amax = x.float().abs().max() * (torch.rand((), generator=gen) + 0.5)
    block_amax = _static_block_amax(gen, x) if blocks == "static" else None
    expected = ref.nvfp4(x, global_amax, block_amax)["fake_quant"]
    ref.assert_same_bits(nvfp4_fake_quant(x, global_amax, block_amax), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocks", ["dynamic", "static"])
def test_quantize_matches_reference(backend, gen, dtype, blocks):
    x = spread(gen, (24, 160), dtype)
    global_amax = x.float().abs().max()
    block_amax = _static_block_amax(gen, x) if blocks == "static" else None
    packed, block_scale, scale_2 = nvfp4_quantize(x, global_amax, block_amax)
    expected = ref.nvfp4(x, global_amax, block_amax)
    assert packed.shape == (24, 80) and block_scale.shape == (24, 10) and scale_2.shape == ()
    assert torch.equal(packed, ref.pack_codes(expected["codes"]))
    assert torch.equal(block_scale.view(torch.uint8), expected["scale_codes"].to(torch.uint8))
    ref.assert_same_bits(scale_2, expected["scale_2"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantized_export_equals_fake_quant(backend, gen, dtype):
    x = spread(gen, (4, 6, 64), dtype)
    global_amax = x.float().abs().max()
    exported = nvfp4_quantize(x, global_amax)
    ref.assert_same_bits(nvfp4_dequantize(*exported, dtype=dtype), nvfp4_fake_quant(x, global_amax))


def test_every_e2m1_tie_point_rounds_to_the_even_code(backend):
    # global amax 2688 gives scale_2 = 1; the 6.0 makes the block scale 1: x / scale is x itself.
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    rounded = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]  # docs/formats.md: ties go to the even code
    x = torch.tensor([6.0, *ties, *[-t for t in ties], 100.0]).reshape(1, 16)
    y = nvfp4_fake_quant(x, torch.tensor(2688.0), torch.tensor([[6.0]]))
    assert y.flatten().tolist() == [6.0, *rounded, *[-r for r in rounded], 6.0]
    # -0.25 rounds to magnitude 0 and is stored as negative zero (0x8), as ModelOpt and the hardware do.
    packed, _, _ = nvfp4_quantize(x, torch.tensor(2688.0), torch.tensor([[6.0]]))
    assert packed[0, 4].item() == 0xA8 and packed[0, 0].item() == 0x07
    assert y[0, 8].item() == 0.0 and y[0, 8].signbit()


@pytest.mark.parametrize("direction", [0.0, 10.0])
def test_values_next_to_tie_points_round_to_the_nearer_value(backend, direction):
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    near = ties.nextafter(torch.full_like(ties, direction))
    x = torch.cat([torch.tensor([6.0]), near, -near, torch.zeros(1)]).reshape(1, 16)
    expected = [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0] if direction else [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0]
    y = nvfp4_fake_quant(x, torch.tensor(2688.0), torch.tensor([[6.0]]))
    assert y[0, 1:8].tolist() == expected and y[0, 8:15].tolist() == [-e for e in expected]


def test_packing_puts_even_elements_in_the_low_nibble(backend):
    x = torch.zeros(1, 16)
    x[0, 0], x[0, 1], x[0, 2], x[0, 3] = 0.5, 6.0, -1.0, 3.0
    packed, block_scale, _ = nvfp4_quantize(x, torch.tensor(2688.0))
    assert packed[0, :2].tolist() == [0x71, 0x5A] and block_scale.float().item() == 1.0


def test_zero_blocks_and_zero_global_amax_give_finite_positive_scales(backend, gen):
    x = spread(gen, (4, 64), torch.float32)
    x[1, 16:32] = 0.0
    packed, block_scale, _ = nvfp4_quantize(x, x.abs().max())
    assert block_scale[1, 1].view(torch.uint8).item() == 0x38  # E4M3 1.0
    zeros = torch.zeros(2, 32, dtype=torch.bfloat16)
    packed, block_scale, scale_2 = nvfp4_quantize(zeros, torch.tensor(0.0))
    assert scale_2 == torch.tensor(1.0) / 2688 and (block_scale.view(torch.uint8) == 0x38).all()
    assert (packed == 0).all() and torch.equal(nvfp4_fake_quant(zeros, torch.tensor(0.0)), zeros)


@pytest.mark.parametrize("global_amax", [1e-30, 1e-6, 1.0, 3e4, 1e30])
def test_no_scale_byte_is_ever_nan(backend, gen, global_amax):
    x = spread(gen, (6, 64), torch.float32)
    x[0] = 0.0
    x[1, :16] = 0.0
    extremes = torch.tensor([0.0, 1e-38, 1.0, 1e38]).repeat(6)
    for block_amax in (None, extremes.reshape(6, 4)):
        _, block_scale, _ = nvfp4_quantize(x, torch.tensor(global_amax), block_amax)
        scale_bytes = block_scale.view(torch.uint8)
        assert not any((scale_bytes == b).any() for b in NAN_SCALE_BYTES)
        assert (block_scale.float() > 0).all()
        expected = ref.nvfp4(x, torch.tensor(global_amax), block_amax)["scale_codes"]
        assert torch.equal(scale_bytes, expected.to(torch.uint8))


def test_values_far_past_the_global_amax_saturate(backend):
    # x / scale overflows float32: still the largest E2M1 value, never NaN.
    x = torch.tensor([3e38, -3e38, 1e30, 1.0] * 4).reshape(1, 16)
    for global_amax in (1e-6, 1.0):
        g = torch.tensor(global_amax)
        y = nvfp4_fake_quant(x, g, torch.full((1, 1), global_amax))
        ref.assert_same_bits(y, ref.nvfp4(x, g, torch.full((1, 1), global_amax))["fake_quant"])
        assert y.isfinite().all() and y[0, 0] > 0 and y[0, 1] < 0


def test_block_scales_in_the_e4m3_subnormal_range(backend):
    # scale_2 = 1 and block amax 6 * k * 2^-9 make s_b = k * 2^-9: the subnormal codes 1..7, their midpoints
    # (ties), and values below 2^-9 that clamp to it.
    steps = torch.tensor([1, 1.5, 2, 2.5, 3, 3.5, 4, 5, 6, 6.5, 7, 7.5, 0.25, 0.5, 0.75, 8.0])
    x = torch.linspace(-1, 1, 16 * 16).reshape(16, 16) * (6 * steps * 2.0**-9)[:, None]
    block_amax = x.abs().amax(-1)
    _, block_scale, _ = nvfp4_quantize(x, torch.tensor(2688.0))
    expected = ref.nvfp4(x, torch.tensor(2688.0))
    assert torch.equal(block_scale.view(torch.uint8), expected["scale_codes"].to(torch.uint8))
    assert block_scale.view(torch.uint8)[:15].max() <= 0x08 and (block_amax > 0).all()
    ref.assert_same_bits(nvfp4_fake_quant(x, torch.tensor(2688.0)), expected["fake_quant"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_inputs_in_the_float_subnormal_range(backend, gen, dtype):
    tiny = torch.finfo(dtype).tiny
    x = ((torch.rand(8, 32, generator=gen) * 2 - 1) * tiny * 0.9).to(dtype)
    assert (x != 0).any() and (x.abs() < tiny).all()
    global_amax = x.float().abs().max()
    ref.assert_same_bits(nvfp4_fake_quant(x, global_amax), ref.nvfp4(x, global_amax)["fake_quant"])


def test_nan_stays_in_place_and_inf_saturates(backend, gen):
    x = spread(gen, (2, 32), torch.float32)
    x[0, 3] = float("nan")
    x[1, 20] = float("inf")
    global_amax = x[x.isfinite()].abs().max()
    y = nvfp4_fake_quant(x, global_amax)
    ref.assert_same_bits(y, ref.nvfp4(x, global_amax)["fake_quant"])
    assert y[0, 3].isnan() and y.isnan().sum() == 1 and y[1, 20].isfinite() and y[1, 20] > 0
    # The NaN does not enter its block's scale: the other 15 elements quantize as if it were 0.
    cleaned = x.nan_to_num(nan=0.0)
    assert torch.equal(y[0, :16][x[0, :16].isfinite()], nvfp4_fake_quant(cleaned, global_amax)[0, :16][x[0, :16].isfinite()])
    with pytest.raises(ValueError, match="NaN"):
        nvfp4_quantize(x, global_amax)


def test_bad_arguments_raise_clear_errors(backend):
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4_fake_quant(torch.ones(4, 24), 1.0)
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4_quantize(torch.ones(24), 1.0)
    with pytest.raises(ValueError, match="block_amax must have shape"):
        nvfp4_fake_quant(torch.ones(4, 32), 1.0, torch.ones(4, 3))
    with pytest.raises(ValueError, match="global_amax must be a scalar"):
        nvfp4_fake_quant(torch.ones(4, 32), torch.ones(4))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        nvfp4_fake_quant(torch.ones(4, 32, dtype=torch.int64), 1.0)
    with pytest.raises(ValueError, match="does not fit"):
        nvfp4_dequantize(torch.zeros(4, 8, dtype=torch.uint8), torch.zeros(4, 2).to(torch.float8_e4m3fn), torch.tensor(1.0))


@pytest.mark.parametrize("global_amax", [1e-36, 1e-30, 1e-25, 1e-20])
def test_tiny_global_amax_matches_reference(backend, gen, global_amax):
    # Below scale_2 = 2^-90 the kernel divides instead of using its reciprocal-and-residual step.
    x = spread(gen, (16, 64), torch.float32) * global_amax
    g = x.abs().max()
    ref.assert_same_bits(nvfp4_fake_quant(x, g), ref.nvfp4(x, g)["fake_quant"])


def test_quotients_beside_tie_points_with_random_scales(backend, gen):
    x, global_amax, block_amax = near_ties(gen, 512)
    expected = ref.nvfp4(x, global_amax, block_amax)
    ref.assert_same_bits(nvfp4_fake_quant(x, global_amax, block_amax), expected["fake_quant"])
    packed, _, _ = nvfp4_quantize(x, global_amax, block_amax)
    assert torch.equal(packed, ref.pack_codes(expected["codes"]))



def _segments(gen, rows, cols, dtype, scales):
    """x of consecutive row segments, segment s scaled by scales[s], with a NaN and an Inf in the first non-empty
    one; a global amax per segment near its max."""
    x = spread(gen, (sum(rows), cols), dtype)
    parts = list(x.float().split(rows))
    for part, scale in zip(parts, scales):
        part.mul_(scale)
    x = torch.cat(parts).to(dtype)
    first = next(s for s, n in enumerate(rows) if n)
    start = sum(rows[:first])
    x[start, 0], x[start, 17 % cols] = float("nan"), float("inf")
    global_amax = torch.stack([
        torch.nan_to_num(p.float().abs(), posinf=0.0).amax() * (torch.rand((), generator=gen) + 0.5) if p.numel() else torch.tensor(1.0)
        for p in x.split(rows)
    ])
    return x, global_amax


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocks", ["dynamic", "static"])
@pytest.mark.parametrize("rows", [[5, 0, 130, 1, 17], [64], [0, 3], [7, 7, 7], [130, 130]])
def test_segments_match_one_fake_quant_per_segment(backend, gen, dtype, blocks, rows):
    # one segment with a global amax so small that its programs divide (scale_2 < 2^-90), mixed with normal ones;
    # equal segments ([7, 7, 7], [130, 130]: the kernel's parts, one program or several, the last one part-full)
    scales = [1.0, 1.0, 3e-30, 1e4, 0.01][: len(rows)]
    x, global_amax = _segments(gen, rows, 48, dtype, scales)
    # static block amax are calibrated, hence finite (the driver refuses NaN)
    block_amax = _static_block_amax(gen, torch.nan_to_num(x, nan=0.0)) if blocks == "static" else None
    expected = [
        ref.nvfp4(part, amax, None if block_amax is None else part_blocks)["fake_quant"]
        for part, amax, part_blocks in zip(x.split(rows), global_amax, (block_amax if block_amax is not None else x).split(rows))
    ]
    ref.assert_same_bits(nvfp4_fake_quant_segments(x, global_amax, rows, block_amax), torch.cat(expected))


@pytest.mark.parametrize("rows", [[128, 0, 256, 128], [1, 300, 2]])
def test_segments_given_as_row_ends_on_the_device(backend, gen, rows):
    """The row ends an MoE layer already holds (its experts' token offsets, int32) in place of the host's
    rows: the same values, whether each kernel program lies in one segment ([128, 0, 256, 128] x 3 blocks per
    row: programs of 128 blocks never straddle) or not."""
    x, global_amax = _segments(gen, rows, 48, torch.bfloat16, [1.0, 5.0, 0.01, 2.0][: len(rows)])
    ends = torch.tensor(rows).cumsum(0).to(torch.int32)
    expected = torch.cat([ref.nvfp4(p, g)["fake_quant"] for p, g in zip(x.split(rows), global_amax)])
    ref.assert_same_bits(nvfp4_fake_quant_segments(x, global_amax, rows, None, ends), expected)


def test_segments_bad_arguments_raise_clear_errors(backend):
    with pytest.raises(ValueError, match="one global amax per segment"):
        nvfp4_fake_quant_segments(torch.ones(4, 32), torch.ones(3), [2, 2])
    with pytest.raises(ValueError, match="summing to x's rows"):
        nvfp4_fake_quant_segments(torch.ones(4, 32), torch.ones(2), [2, 1])
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4_fake_quant_segments(torch.ones(4, 24), torch.ones(2), [2, 2])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocks", ["dynamic", "static"])
@pytest.mark.parametrize("rows", [[5, 0, 130, 1, 17], [64], [0, 3], [7, 7, 7], [130, 130]])
def test_segments_quantize_like_one_quantize_per_segment(backend, gen, dtype, blocks, rows):
    """The export's batched quantize of an MoE layer's experts: every byte as the reference gives it per segment
    (Inf saturates; NaN is the caller's to refuse), and it dequantizes to the segmented fake quant."""
    scales = [1.0, 1.0, 3e-30, 1e4, 0.01][: len(rows)]
    x, global_amax = _segments(gen, rows, 48, dtype, scales)
    x = torch.nan_to_num(x, nan=0.0, posinf=float("inf"), neginf=float("-inf"))
    block_amax = _static_block_amax(gen, x.nan_to_num(posinf=0.0, neginf=0.0)) if blocks == "static" else None
    packed, block_scale, scale_2 = nvfp4_quantize_segments(x, global_amax, rows, block_amax)
    parts = (block_amax if block_amax is not None else x).split(rows)
    expected = [ref.nvfp4(p, g, None if block_amax is None else b) for p, g, b in zip(x.split(rows), global_amax, parts)]
    assert packed.shape == (sum(rows), 24) and block_scale.shape == (sum(rows), 3) and scale_2.shape == (len(rows),)
    assert torch.equal(packed, torch.cat([ref.pack_codes(e["codes"]) for e in expected]))
    assert torch.equal(block_scale.view(torch.uint8), torch.cat([e["scale_codes"] for e in expected]).to(torch.uint8))
    ref.assert_same_bits(scale_2, torch.stack([e["scale_2"] for e in expected]))
    dequantized = nvfp4_dequantize(packed, block_scale, scale_2, dtype, rows)
    ref.assert_same_bits(dequantized, nvfp4_fake_quant_segments(x, global_amax, rows, block_amax))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_of_every_code_and_scale_matches_reference(backend, gen, dtype):
    """Random bytes reach all 16 codes (-0.0 included) and every finite E4M3 scale, subnormal ones too."""
    packed = torch.randint(0, 256, (300, 24), generator=gen, dtype=torch.uint8)
    scale_bytes = torch.randint(0, 0x7F, (300, 3), generator=gen, dtype=torch.uint8)  # 0x7F and up: NaN, negative
    scale_2 = torch.rand((), generator=gen) * 1e-3
    got = nvfp4_dequantize(packed, scale_bytes.view(torch.float8_e4m3fn), scale_2, dtype)
    ref.assert_same_bits(got, ref.dequantize(packed, scale_bytes, scale_2).to(dtype))
    rows = [100, 0, 200]
    scales_2 = torch.rand(3, generator=gen) * 10
    got = nvfp4_dequantize(packed, scale_bytes.view(torch.float8_e4m3fn), scales_2, dtype, rows)
    parts = zip(packed.split(rows), scale_bytes.split(rows), scales_2)
    ref.assert_same_bits(got, torch.cat([ref.dequantize(*part) for part in parts]).to(dtype))
