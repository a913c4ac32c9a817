"""FP8 block numerics (dist_quant/numerics/fp8_blocks.py): 128x128 weight blocks and 1x128 per-token activation
groups (these also as Triton kernels: the `backend` fixture runs both), bit for bit against the independent
element-by-element reference (tests/reference/mx.py: DeepSeek-V3's block definition, ModelOpt 0.47's export
scales, vLLM's per_token_group_quant_fp8), against the FP8 block-scaled source checkpoints the bridge reads
(tests/reference/fp8_blocks.py), and byte for byte against ModelOpt 0.47's export of FP8 per-block weights where
nvidia-modelopt 0.47 is installed."""

import pytest
import torch

from dist_quant.kernels.block_formats import fp8_group_fake_quant, fp8_group_quantize
from dist_quant.numerics import fp8_block_dequantize, fp8_block_fake_quant, fp8_block_quantize, fp8_group_dequantize
from dist_quant.numerics.fp8_blocks import GROUP_AMAX_FLOOR
from tests.reference import fp8_blocks as source
from tests.reference import mx as ref
from tests.reference.data import DTYPES, spread
from tests.reference.formats import assert_same_bits
from tests.reference.modelopt import WITH_MODELOPT, modelopt_module

E4M3_MIDPOINTS = torch.tensor([(a + b) / 2 for a, b in zip(ref.E4M3_VALUES, ref.E4M3_VALUES[1:])])
FLOAT32_MAX = torch.finfo(torch.float32).max


@pytest.fixture(scope="module")
def modelopt():
    """ModelOpt 0.47's quantize and export utilities (importing it takes tens of seconds)."""
    return modelopt_module("modelopt.torch.quantization"), modelopt_module("modelopt.torch.export.quant_utils")


def _ties(gen, count: int, power: float) -> torch.Tensor:
    """Midpoints between neighbouring E4M3 values times `power`, random signs, led by 448 x `power` (the amax,
    so that the scale is `power` exactly)."""
    picked = E4M3_MIDPOINTS[torch.randint(0, len(E4M3_MIDPOINTS), (count,), generator=gen)]
    ties = picked * power * (torch.randint(0, 2, (count,), generator=gen) * 2 - 1)
    ties[0] = 448.0 * power
    return ties


def weight_data(gen, shape, dtype, block, nonfinite=False):
    """`spread` weights with, in the first matrix: an all-zero block, a block of values below float32's normal
    range (where the amax clamp to 2^-126 binds; float16 has none: its own subnormals), a block (maybe partial) of
    exact ties under a power-of-two scale; with `nonfinite`, +-Inf and NaN in the fourth block."""
    w = spread(gen, shape, dtype)
    matrix = w.view(-1, *shape[-2:])[0]
    r, c = block
    assert shape[-2] > r + 1 and shape[-1] > c + 1, "weight_data needs 2 x 2 blocks"
    matrix[:r, :c] = 0
    tiny = 2.0**-130 if dtype != torch.float16 else torch.finfo(dtype).tiny
    matrix[:r, c : 2 * c] = (torch.rand(r, min(c, shape[-1] - c), generator=gen) * tiny).to(dtype)
    power = 2.0 ** torch.randint(-10, 4, (), generator=gen).item()
    ties_shape = (min(r, shape[-2] - r), c)
    matrix[r : 2 * r, :c] = _ties(gen, ties_shape[0] * c, power).reshape(ties_shape).to(dtype)
    if nonfinite:
        matrix[r, c], matrix[r, c + 1], matrix[r + 1, c] = float("inf"), float("nan"), -float("inf")
    return w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "block"), [((200, 300), (128, 128)), ((2, 96, 160), (32, 48)), ((13, 70), (4, 8))])
def test_weight_blocks_match_reference(gen, dtype, shape, block):
    w = weight_data(gen, shape, dtype, block, nonfinite=True)
    expected = ref.fp8_weight_blocks(w, block)
    values, scales = fp8_block_quantize(w, block)
    grid = (-(-shape[-2] // block[0]), -(-shape[-1] // block[1]))
    assert values.dtype == torch.float8_e4m3fn and values.shape == w.shape
    assert scales.dtype == torch.float32 and scales.shape == (*shape[:-2], *grid)
    ref.assert_same_codes(values, expected["codes"])
    assert_same_bits(scales, expected["scales"])
    assert_same_bits(fp8_block_fake_quant(w, block), expected["fake_quant"])
    assert_same_bits(fp8_block_dequantize(values, scales, dtype, block), expected["fake_quant"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_blocks_are_the_source_checkpoints_the_bridge_reads(gen, dtype):
    """The FP8 block-scaled checkpoints of the source tests (DeepSeek's layout, tail blocks partial, a zero block's
    scale 1) and their reference dequantization are what fp8_block_quantize / fp8_block_dequantize give."""
    w = spread(gen, (300, 200), dtype)
    w[128:256, :128] = 0
    values, scales = source.quantized_in_blocks(w, (128, 128))
    ours = fp8_block_quantize(w)
    assert torch.equal(ours[0].view(torch.uint8), values.view(torch.uint8)) and torch.equal(ours[1], scales)
    assert_same_bits(fp8_block_dequantize(*ours, dtype=dtype), source.dequantized(values, scales, (128, 128), dtype))


@WITH_MODELOPT
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_blocks_equal_modelopt_export(modelopt, gen, dtype):
    """ModelOpt 0.47's FP8 per-block weight path: a Linear quantized with FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG (max
    calibration of 128x128 block amax), then its export's get_weight_scaling_factor and to_quantized_weight."""
    mtq, quant_utils = modelopt
    linear = torch.nn.Linear(300, 280, bias=False).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(weight_data(gen, (280, 300), dtype, (128, 128)))
    weight = linear.weight.detach().clone()
    model = mtq.quantize(torch.nn.Sequential(linear), mtq.FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG,
                         forward_loop=lambda m: m(torch.ones(1, 300, dtype=dtype)))
    layer = model[0]
    assert quant_utils.get_quantization_format(layer) == "fp8_pb_wo"
    modelopt_scales = quant_utils.get_weight_scaling_factor(layer).squeeze()
    modelopt_values = quant_utils.to_quantized_weight(weight, modelopt_scales, "fp8_pb_wo", None, 128)
    values, scales = fp8_block_quantize(weight)
    assert_same_bits(modelopt_scales, scales)
    assert torch.equal(modelopt_values.view(torch.uint8), values.view(torch.uint8))


def test_weight_nan_and_inf():
    """NaN stays NaN and is left out of its block's amax; +-Inf clamps the amax to float32 max and becomes +-448."""
    w = torch.ones(4, 8)
    w[0, 0], w[1, 4], w[2, 2] = float("nan"), float("inf"), 2.0
    values, scales = fp8_block_quantize(w, (2, 4))
    assert torch.equal(scales, torch.tensor([[1.0, FLOAT32_MAX], [2.0, 1.0]]) / torch.tensor(448.0))
    assert values.float()[0, 0].isnan() and values.float()[1, 4].item() == 448.0
    assert values.float()[0, 1].item() == 448.0 and values.float()[1, 5].item() == 0.0


def group_data(gen, shape, dtype, nonfinite=False):
    """`spread` activations with, in the first rows: an all-zero group of +0 and -0, a group below the amax floor 1e-10 (float16
    has none: its subnormals start at 6e-8), a group of exact ties under a power-of-two scale; with `nonfinite`,
    +-Inf and NaN in other groups."""
    x = spread(gen, shape, dtype)
    rows = x.view(-1, shape[-1])
    rows[0, :128] = 0
    rows[0, 1:128:2] = -0.0  # the sign of zero survives quantization
    rows[2, 128 + 3] = -0.0  # and a -0 beside other values
    rows[1, :128] = (torch.rand(128, generator=gen) * (1e-11 if dtype != torch.float16 else 1e-7)).to(dtype)
    rows[2, :128] = _ties(gen, 128, 2.0 ** torch.randint(-10, 4, (), generator=gen).item()).to(dtype)
    if nonfinite:
        rows[3, 5], rows[3, 9], rows[4, 130] = float("inf"), float("nan"), float("nan")
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale_format", ["float32", "ue8m0"])
@pytest.mark.parametrize("shape", [(6, 256), (2, 3, 384)])
def test_token_groups_match_reference(backend, gen, dtype, scale_format, shape):
    x = group_data(gen, shape, dtype, nonfinite=True)
    expected = ref.fp8_token_groups(x, 128, scale_format)
    values, scales = fp8_group_quantize(x, scale_format=scale_format)
    assert values.dtype == torch.float8_e4m3fn and values.shape == x.shape
    assert scales.dtype == torch.float32 and scales.shape == (*shape[:-1], shape[-1] // 128)
    ref.assert_same_codes(values, expected["codes"])
    assert_same_bits(scales, expected["scales"])
    assert_same_bits(fp8_group_fake_quant(x, scale_format=scale_format), expected["fake_quant"])
    assert_same_bits(fp8_group_dequantize(values, scales, dtype), expected["fake_quant"])


def test_token_group_scales(backend, gen):
    """float32: max(amax, 1e-10) / 448, a zero group's values all zero; ue8m0: the smallest power of two at or
    above the float32 scale; a group holding Inf dequantizes to NaN (Inf / Inf and 0 x Inf), as in vLLM."""
    x = spread(gen, (64, 256))
    x[0, :128] = 0
    x[1, 128:] = float("inf")
    plain = fp8_group_quantize(x)[1]
    assert plain[0, 0].item() == torch.tensor(GROUP_AMAX_FLOOR).div(torch.tensor(448.0)).item()
    assert plain[1, 1].item() == float("inf") and fp8_group_fake_quant(x)[1, 128:].isnan().all()
    power = fp8_group_quantize(x, scale_format="ue8m0")[1][~plain.isinf()]
    plain = plain[~plain.isinf()]
    mantissa, _ = torch.frexp(power)
    assert (mantissa == 0.5).all() and (power >= plain).all() and (power / 2 < plain).all()
    assert fp8_group_fake_quant(x, scale_format="ue8m0")[0, :128].eq(0).all()


def test_bad_arguments_raise_one_line_errors(backend):
    with pytest.raises(ValueError, match="at least two dimensions, got shape \\(128,\\)"):
        fp8_block_quantize(torch.ones(128))
    with pytest.raises(ValueError, match="two positive sizes"):
        fp8_block_quantize(torch.ones(4, 4), (0, 128))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        fp8_block_quantize(torch.ones(4, 4, dtype=torch.int64))
    values = torch.ones(200, 300).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"float32 scales of shape \(2, 3\)"):
        fp8_block_dequantize(values, torch.ones(2, 2))
    with pytest.raises(ValueError, match="multiple of the group size 128, got shape \\(4, 200\\)"):
        fp8_group_quantize(torch.ones(4, 200))
    with pytest.raises(ValueError, match="scale_format must be one of float32, ue8m0, got 'e8m0'"):
        fp8_group_quantize(torch.ones(4, 128), scale_format="e8m0")
    with pytest.raises(ValueError, match=r"float32 scales \(4, 1\)"):
        fp8_group_dequantize(torch.ones(4, 128).to(torch.float8_e4m3fn), torch.ones(4, 1, dtype=torch.float16))
