"""The MXFP8, MXFP4, FP8 token-group and per-tensor FP8 Triton kernels compiled for a real GPU (run on the device machine; skipped
without CUDA), bit for bit against the independent reference and the torch reference on the GPU. The interpreter
covers the same kernels on CPU in test_mx.py and test_fp8_block_numerics.py."""

import pytest
import torch

from dist_quant.kernels import use_triton
from dist_quant.kernels.block_formats import (
    fp8_fake_quant,
    fp8_group_fake_quant,
    fp8_group_quantize,
    mxfp4_fake_quant,
    mxfp4_quantize,
    mxfp8_fake_quant,
    mxfp8_quantize,
)
from dist_quant.numerics import fp8, fp8_blocks, mx
from tests.reference import formats
from tests.reference import mx as ref
from tests.reference.data import DTYPES
from tests.reference.formats import assert_same_bits, pack_codes
from tests.unit.test_fp8_block_numerics import group_data
from tests.unit.test_mx import mx_data

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _same_e4m3_bytes(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal E4M3 bytes, NaN at the same places (its sign aside)."""
    a, e = actual.cpu().view(torch.uint8), expected.cpu().view(torch.uint8)
    nan = (e & 0x7F) == 0x7F
    assert torch.equal((a & 0x7F) == 0x7F, nan) and torch.equal(a[~nan], e[~nan])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 96), (9, 70), (3, 7, 4096)])
def test_mx_kernels_on_cuda_match_reference(gen, dtype, shape):
    x = mx_data(gen, shape, dtype, "mxfp8", nonfinite=True)
    assert use_triton(x.cuda())
    expected = ref.mx(x, "e4m3")
    assert_same_bits(mxfp8_fake_quant(x.cuda()).cpu(), expected["fake_quant"])
    values, scales = mxfp8_quantize(x.cuda())
    ref.assert_same_codes(values.cpu(), expected["codes"])
    assert torch.equal(scales.cpu(), expected["scales"])
    if shape[-1] % 32 == 0:
        x = mx_data(gen, shape, dtype, "mxfp4", nonfinite=True)
        assert_same_bits(mxfp4_fake_quant(x.cuda()).cpu(), ref.mx(x, "e2m1")["fake_quant"])
        x = mx_data(gen, shape, dtype, "mxfp4")
        packed, scales = mxfp4_quantize(x.cuda())
        expected = ref.mx(x, "e2m1")
        assert torch.equal(packed.cpu(), pack_codes(expected["codes"])) and torch.equal(scales.cpu(), expected["scales"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale_format", ["float32", "ue8m0"])
def test_fp8_group_kernels_on_cuda_match_reference(gen, dtype, scale_format):
    x = group_data(gen, (64, 512), dtype, nonfinite=True)
    expected = ref.fp8_token_groups(x, 128, scale_format)
    assert_same_bits(fp8_group_fake_quant(x.cuda(), scale_format=scale_format).cpu(), expected["fake_quant"])
    values, scales = fp8_group_quantize(x.cuda(), scale_format=scale_format)
    ref.assert_same_codes(values.cpu(), expected["codes"])
    assert_same_bits(scales.cpu(), expected["scales"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_tensors_on_cuda_match_the_torch_reference(gen, dtype):
    """Kernels against the torch reference on the GPU itself (torch's CUDA ops: frexp, division by a tensor)."""
    x = (torch.randn(4096, 4096, generator=gen) * torch.rand(4096, 1, generator=gen) * 100).to(dtype).cuda()
    assert_same_bits(mxfp8_fake_quant(x), mx.mxfp8_fake_quant(x))
    _same_e4m3_bytes(mxfp8_quantize(x)[0], mx.mxfp8_quantize(x)[0])
    assert_same_bits(mxfp4_fake_quant(x), mx.mxfp4_fake_quant(x))
    assert torch.equal(mxfp4_quantize(x)[0], mx.mxfp4_quantize(x)[0])
    for scale_format in ("float32", "ue8m0"):
        assert_same_bits(fp8_group_fake_quant(x, scale_format=scale_format),
                         fp8_blocks.fp8_group_fake_quant(x, scale_format=scale_format))
    amax = x.float().abs().max()
    for scaled in (amax, amax * 0.3, torch.zeros_like(amax)):
        assert_same_bits(fp8_fake_quant(x, scaled), fp8.fp8_fake_quant(x, scaled))


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_tensor_fp8_kernel_on_cuda_matches_reference(gen, dtype):
    x = mx_data(gen, (9, 4100), dtype, "mxfp8", nonfinite=True)  # a partial last program, NaN and Inf
    x[0, :3] = torch.tensor([-0.0, -1e-30, 1e-30])
    for amax in (torch.tensor(448.0), x[1:].float().abs().nan_to_num(posinf=0).max() * 0.5, torch.tensor(0.0)):
        assert_same_bits(fp8_fake_quant(x.cuda(), amax.cuda()).cpu(), formats.fp8_fake_quant(x, amax))
