"""MXFP8 and MXFP4 numerics, torch reference (dist_quant/numerics/mx.py) and Triton kernels alike (the `backend`
fixture runs both), bit for bit against the independent element-by-element reference of tests/reference/mx.py
(the OCP MX spec's definitions with ModelOpt 0.47's scale and rounding rules), and byte for byte against ModelOpt
0.47's own quantizers (MXFP8QTensor, MXFP4QTensor: the tensors its export writes) where nvidia-modelopt 0.47 is
installed."""

import pytest
import torch

from dist_quant.kernels.block_formats import mxfp4_fake_quant, mxfp4_quantize, mxfp8_fake_quant, mxfp8_quantize
from dist_quant.numerics import mxfp4_dequantize, mxfp8_dequantize
from dist_quant.numerics.mx import E8M0_NAN, shared_exponent
from tests.reference import mx as ref
from tests.reference.data import DTYPES, spread
from tests.reference.formats import assert_same_bits, pack_codes
from tests.reference.modelopt import WITH_MODELOPT, modelopt_module

E4M3_MIDPOINTS = [(a + b) / 2 for a, b in zip(ref.E4M3_VALUES, ref.E4M3_VALUES[1:])]
E2M1_MIDPOINTS = [(a + b) / 2 for a, b in zip(ref.E2M1_VALUES, ref.E2M1_VALUES[1:])]
ELEMENT = {"mxfp8": ("e4m3", 448.0, E4M3_MIDPOINTS), "mxfp4": ("e2m1", 6.0, E2M1_MIDPOINTS)}


@pytest.fixture(scope="module")
def modelopt_qtensor():
    """ModelOpt 0.47's quantized tensors (importing it takes tens of seconds)."""
    return modelopt_module("modelopt.torch.quantization.qtensor")


def _next_up(x: torch.Tensor) -> torch.Tensor:
    """The next representable value above each positive finite x, in its own dtype."""
    bits = {2: torch.int16, 4: torch.int32}[x.element_size()]
    return (x.view(bits) + 1).view(x.dtype)


def mx_data(gen, shape, dtype, fmt, nonfinite=False, ulp_past_power_of_two=True):
    """`spread` values with special blocks in the first rows (the rest random): zeros and -0.0, an all-zero block,
    values in dtype's subnormal range, exact ties of the element grid under an amax of element_max x 2^k, a block
    whose amax is element_max x 2^k (with `ulp_past_power_of_two`, one dtype ulp more), float32 magnitudes at both
    ends of the E8M0 range; with `nonfinite`, +-Inf and NaN."""
    _, element_max, midpoints = ELEMENT[fmt]
    x = spread(gen, shape, dtype)
    rows = x.view(-1, shape[-1])
    assert rows.shape[0] >= 8 and shape[-1] >= 32, "mx_data needs 8 rows of at least one block"
    width = min(32, shape[-1])
    power = 2.0 ** torch.randint(-8, 5, (), generator=gen).item()
    ties = torch.tensor(midpoints)[torch.randint(0, len(midpoints), (width,), generator=gen)] * power
    signs = torch.randint(0, 2, (width,), generator=gen) * 2 - 1
    rows[0, :width] = 0
    rows[0, 1] = -0.0
    rows[1, :width] = (torch.finfo(dtype).tiny * torch.rand(width, generator=gen)).to(dtype)
    rows[2, :width] = (ties * signs).to(dtype)
    rows[2, 0] = element_max * power
    rows[3, :width] = (torch.rand(width, generator=gen) * element_max * power).to(dtype)
    rows[3, 0] = element_max * power
    if ulp_past_power_of_two:
        rows[3, 0] = _next_up(rows[3, 0])
    if dtype != torch.float16:  # the E8M0 range's ends: amax near 448 x 2^-127 and near float32's max
        rows[4, :width] = (torch.rand(width, generator=gen) * 1e-37).to(dtype)
        rows[5, :width] = (torch.randn(width, generator=gen) * 1e37).to(dtype)
    if nonfinite:
        rows[6, 3], rows[6, 7] = float("inf"), -float("inf")
        rows[7, 5] = float("nan")
    return x


SHAPES = [(8, 64), (2, 5, 96), (16, 256)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [*SHAPES, (9, 70), (8, 40)])  # partial last blocks
def test_mxfp8_matches_reference(backend, gen, dtype, shape):
    x = mx_data(gen, shape, dtype, "mxfp8", nonfinite=True)
    expected = ref.mx(x, "e4m3")
    values, scales = mxfp8_quantize(x)
    assert values.dtype == torch.float8_e4m3fn and values.shape == x.shape
    assert scales.dtype == torch.uint8 and scales.shape == (*shape[:-1], -(-shape[-1] // 32))
    ref.assert_same_codes(values, expected["codes"])
    assert torch.equal(scales, expected["scales"])
    assert_same_bits(mxfp8_fake_quant(x), expected["fake_quant"])
    assert_same_bits(mxfp8_dequantize(values, scales, dtype), expected["fake_quant"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_mxfp4_matches_reference(backend, gen, dtype, shape):
    x = mx_data(gen, shape, dtype, "mxfp4")
    expected = ref.mx(x, "e2m1")
    packed, scales = mxfp4_quantize(x)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], shape[-1] // 2)
    assert scales.dtype == torch.uint8 and scales.shape == (*shape[:-1], shape[-1] // 32)
    assert torch.equal(packed, pack_codes(expected["codes"]))
    assert torch.equal(scales, expected["scales"])
    assert_same_bits(mxfp4_fake_quant(x), expected["fake_quant"])
    assert_same_bits(mxfp4_dequantize(packed, scales, dtype), expected["fake_quant"])


@WITH_MODELOPT
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [*SHAPES, (9, 70)])
def test_mxfp8_bytes_equal_modelopt(modelopt_qtensor, gen, dtype, shape):
    """ModelOpt's real quantization (MXFP8QTensor.quantize, which pads a partial block) and, for whole blocks, its
    export (get_weights_scaling_factor + quantize_with_scale); its dequantize too."""
    mxfp8 = modelopt_qtensor.MXFP8QTensor
    # A float32 amax one ulp past 448 x 2^k is where ModelOpt's torch.log2 parts from the exact rule (see
    # test_modelopt_log2_rounds_float32_quotients_just_above_a_power_of_two_down)
    x = mx_data(gen, shape, dtype, "mxfp8", ulp_past_power_of_two=dtype != torch.float32)
    values, scales = mxfp8_quantize(x)
    quantized, modelopt_scales = mxfp8.quantize(x)
    assert torch.equal(quantized._quantized_data.view(torch.uint8), values.view(torch.uint8))
    assert torch.equal(modelopt_scales, scales)
    assert_same_bits(quantized.dequantize(scale=modelopt_scales), mxfp8_dequantize(values, scales, dtype))
    if shape[-1] % 32 == 0:
        exported_scales = mxfp8.get_weights_scaling_factor(x)
        assert torch.equal(exported_scales, scales)
        assert torch.equal(mxfp8.quantize_with_scale(x, exported_scales).view(torch.uint8), values.view(torch.uint8))


@WITH_MODELOPT
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_mxfp4_bytes_equal_modelopt(modelopt_qtensor, gen, dtype, shape):
    """MXFP4QTensor.quantize is what ModelOpt's export writes (its scales reshaped to [..., n/32])."""
    x = mx_data(gen, shape, dtype, "mxfp4", ulp_past_power_of_two=dtype != torch.float32)
    packed, scales = mxfp4_quantize(x)
    quantized, modelopt_scales = modelopt_qtensor.MXFP4QTensor.quantize(x, 32)
    assert torch.equal(quantized._quantized_data, packed)
    assert torch.equal(modelopt_scales.reshape(scales.shape), scales)
    dequantized = quantized.dequantize(dtype=dtype, scale=modelopt_scales, block_sizes={-1: 32})
    assert_same_bits(dequantized, mxfp4_dequantize(packed, scales, dtype))


def _every_positive_finite(dtype) -> torch.Tensor:
    bits = torch.arange(1, torch.tensor(torch.finfo(dtype).max, dtype=dtype).view(torch.int16).item() + 1)
    return bits.to(torch.int16).view(dtype)


@WITH_MODELOPT
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_shared_exponents_equal_modelopt_for_every_16_bit_amax(modelopt_qtensor, dtype):
    """For bfloat16 and float16 inputs no amax / element_max lies within float32 ulps of a power of two, so
    ModelOpt's torch.log2 and the exact ceil agree on every possible block amax, for both formats."""
    amax = _every_positive_finite(dtype)
    modelopt_mxfp8 = modelopt_qtensor.MXFP8QTensor._compute_e8m0_exponent(amax)
    assert torch.equal(shared_exponent(amax.float(), 448.0), modelopt_mxfp8.int())
    blocks = torch.zeros(len(amax), 32, dtype=dtype)
    blocks[:, 0] = amax
    _, modelopt_mxfp4 = modelopt_qtensor.MXFP4QTensor.quantize(blocks, 32)
    assert torch.equal(mxfp4_quantize(blocks)[1], modelopt_mxfp4.reshape(-1, 1))


@WITH_MODELOPT
def test_modelopt_log2_rounds_float32_quotients_just_above_a_power_of_two_down(modelopt_qtensor):
    """Where dist_quant and ModelOpt 0.47 part (float32 input only): amax / 448 one ulp above 2^100 has
    ceil(log2(.)) = 101, and no element saturates; ModelOpt's torch.log2 returns exactly 100.0 there (CPU), so its
    exponent is 100 and that amax saturates to 448 x 2^100."""
    amax = _next_up(torch.tensor(448.0 * 2.0**100))
    assert torch.log2(amax / 448.0).item() == 100.0  # torch's float32 log2 rounds the +2^-23/ln2 away
    assert shared_exponent(amax, 448.0).item() == 101
    assert modelopt_qtensor.MXFP8QTensor._compute_e8m0_exponent(amax).item() == 100
    x = torch.zeros(1, 32)
    x[0, 0] = amax
    assert mxfp8_fake_quant(x)[0, 0].item() == 2.0**101 * 224  # amax / 2^101 = 224 + 2^-20: rounds to 224


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4"])
def test_shared_exponent_is_the_spec_suggestion_plus_one_where_the_spec_would_saturate(backend, gen, fmt):
    """The OCP spec suggests floor(log2(amax)) - emax_elem: the block max's significand times 2^emax_elem may
    then exceed the element max (1.75 x 2^8 = 448, 1.5 x 2^2 = 6) and saturate. ModelOpt's exponent (and ours) is
    one higher exactly in those blocks: the amax's significand exceeds 1.75 (E4M3) or 1.5 (E2M1)."""
    element, element_max, _ = ELEMENT[fmt]
    significand_max = element_max / 2.0 ** ref.ELEMENTS[element][1]
    amax = spread(gen, (4096,)).abs()
    mantissa, _ = torch.frexp(amax)  # amax = mantissa x 2^e, mantissa in [0.5, 1): significand = 2 x mantissa
    spec = torch.tensor([ref.ocp_exponent(a, element) for a in amax.tolist()])
    assert torch.equal(shared_exponent(amax, element_max), spec + (2 * mantissa > significand_max).int())
    # The spec saturates a block max of 470 (significand 1.84) or 7.5 (1.875); ModelOpt halves it to 235 or 3.75
    block = torch.zeros(1, 32)
    block[0, 0] = 470.0 if fmt == "mxfp8" else 7.5
    spec_block = ref.mx(block, element, rule="ocp")["fake_quant"][0, 0].item()
    ours = (mxfp8_fake_quant if fmt == "mxfp8" else mxfp4_fake_quant)(block)[0, 0].item()
    assert (spec_block, ours) == ((448.0, 480.0) if fmt == "mxfp8" else (6.0, 8.0))


def test_mxfp4_ties_go_to_the_smaller_magnitude_and_zero_has_the_sign_bit(backend):
    """ModelOpt 0.47's cast_fp4 (the spec's round-to-nearest-even would give 0, 1, 1, 2, 2, 4, 4): amax 6 makes
    the scale 1, so x is its own quotient."""
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    x = torch.tensor([6.0, *ties, *[-t for t in ties], 0.0, -0.0, 1e-9] + [0.0] * 14).reshape(1, 32)
    y = mxfp4_fake_quant(x)
    assert y[0, :15].tolist() == [6.0, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0]
    assert y[0, 17].item() == 0.0 and not y[0, 17].signbit()  # a positive value rounding to 0 keeps sign bit 0
    assert y[0, 15].signbit() and y[0, 16].signbit() and y[0, 31].signbit()  # zeros come back as -0.0
    packed, scales = mxfp4_quantize(x)
    assert scales.item() == 127
    assert packed[0, :10].tolist() == [0x07, 0x21, 0x43, 0x65, 0x98, 0xBA, 0xDC, 0x8E, 0x08, 0x88]


def test_nonfinite_values(backend, gen):
    x = spread(gen, (2, 64))
    x[0, 3], x[0, 4], x[1, 40] = float("nan"), float("inf"), -float("inf")
    without_nan = x.clone()
    without_nan[0, 3] = 0.0
    for fake_quant, quantize in ((mxfp8_fake_quant, mxfp8_quantize), (mxfp4_fake_quant, None)):
        y = fake_quant(x)
        assert torch.equal(y.isnan(), x.isnan())  # NaN in place, and it does not change its block
        assert y[0, 4].item() == float("inf") and y[1, 40].item() == -float("inf")  # +-max x 2^127 overflows float32
    values, scales = mxfp8_quantize(x)
    assert scales[0, 0].item() == 254 and scales[1, 1].item() == 254
    assert values.view(torch.uint8)[0, 4].item() == 0x7E and values.view(torch.uint8)[1, 40].item() == 0xFE
    nan_free = x.clone()
    nan_free[0, 4], nan_free[1, 40] = 1.0, 1.0
    nan_free[0, 3] = float("nan")
    assert torch.equal(mxfp8_quantize(nan_free)[1], mxfp8_quantize(torch.nan_to_num(nan_free, nan=0.0))[1])
    with pytest.raises(ValueError, match="NaN, which E2M1 cannot encode"):
        mxfp4_quantize(x)


def test_e8m0_range_ends(backend):
    """Scale bytes 0x00 (2^-127, a float32 subnormal) and 0xFE (2^127); 0xFF is NaN when dequantized."""
    tiny = torch.zeros(1, 32)
    tiny[0, 0], tiny[0, 1], tiny[0, 2] = 448.0 * 2.0**-127, 2.0**-136, 2.0**-138  # amax / 448 = 2^-127 exactly
    values, scales = mxfp8_quantize(tiny)
    assert scales.item() == 0 and values.float()[0, :3].tolist() == [448.0, 2.0**-9, 0.0]  # 2^-11: below half 2^-9
    assert_same_bits(mxfp8_dequantize(values, scales), torch.where(tiny == 2.0**-138, 0.0, tiny))
    all_zero = torch.zeros(3, 64, dtype=torch.bfloat16)
    for quantize in (mxfp8_quantize, mxfp4_quantize):
        assert quantize(all_zero)[1].eq(0).all()
    nan_scale = torch.tensor([[E8M0_NAN, 127]], dtype=torch.uint8)
    y = mxfp8_dequantize(torch.ones(1, 64).to(torch.float8_e4m3fn), nan_scale)
    assert y[0, :32].isnan().all() and y[0, 32:].eq(1).all()
    y = mxfp4_dequantize(torch.full((1, 32), 0x22, dtype=torch.uint8), nan_scale)
    assert y[0, :32].isnan().all() and y[0, 32:].eq(1).all()


def test_bad_arguments_raise_one_line_errors(backend):
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        mxfp8_quantize(torch.ones(32, dtype=torch.int32))
    with pytest.raises(ValueError, match="at least one dimension"):
        mxfp8_quantize(torch.tensor(1.0))
    with pytest.raises(ValueError, match="multiple of 32, got shape \\(4, 48\\)"):
        mxfp4_quantize(torch.ones(4, 48))
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4_fake_quant(torch.ones(4, 48))
    values = torch.ones(4, 64).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"scales must be uint8 E8M0 bytes of shape \(4, 2\)"):
        mxfp8_dequantize(values, torch.zeros(4, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="values must be float8_e4m3fn"):
        mxfp8_dequantize(values.float(), torch.zeros(4, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"scales must be uint8 E8M0 bytes of shape \(4, 2\)"):
        mxfp4_dequantize(torch.zeros(4, 32, dtype=torch.uint8), torch.zeros(4, 2))
