"""Number formats as objects (docs/formats.md): what a format writes into a checkpoint is what it declares (the
layout the verifier checks), its recipe spellings select it, and a quantizer configured with it fake-quantizes
through it."""

import pytest
import torch

from dist_quant.formats import FORMATS, SPELLINGS, STATIC, QuantFormat
from dist_quant.quantizer import QuantizerMode, TensorQuantizer


@pytest.mark.parametrize("name", FORMATS)
def test_the_checkpoint_tensors_a_format_writes_are_the_ones_it_declares(name):
    number = FORMATS[name]
    gen = torch.Generator().manual_seed(5)
    weights = [torch.randn(rows, 64, generator=gen, dtype=torch.bfloat16) for rows in (32, 48)]
    amax = torch.stack([w.float().abs().max() for w in weights])
    (values, blocks, scales), checks = number.quantize_weights(torch.cat(weights), amax, [32, 48], None)
    assert all(not bad for _, bad in checks)
    for i, weight in enumerate(weights):
        written = dict(number.weight_checkpoint("m", values[i], None if blocks is None else blocks[i], scales[i]))
        declared = number.weight_tensors("m", tuple(weight.shape))
        assert written.keys() == declared.keys()
        for tensor_name, spec in declared.items():
            assert tuple(written[tensor_name].shape) == spec.shape and written[tensor_name].dtype in spec.dtypes, tensor_name
        assert written["m.weight"].dtype == number.weight_dtype
        assert sum(t.numel() * t.element_size() for t in written.values()) / weight.numel() == pytest.approx(number.weight_bytes, abs=0.01)


def test_recipe_spellings_select_each_format_once():
    assert {number.name for number in SPELLINGS.values()} == set(FORMATS)
    assert len(SPELLINGS) == sum(len(number.spellings) for number in FORMATS.values())


@pytest.mark.parametrize("fmt", [QuantFormat("fp8"), QuantFormat("fp8", axis=0), QuantFormat("nvfp4", block_type="dynamic"),
                                 QuantFormat("nvfp4", block_type=STATIC)], ids=lambda f: f.describe())
def test_a_quantizer_fake_quantizes_through_its_format(fmt):
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    quantizer = TensorQuantizer(fmt)
    quantizer.calibrate_from(weight)
    quantizer.mode = QuantizerMode.QUANTIZING
    block_amax = quantizer._block_amax if fmt.block_type == STATIC else None
    expected = fmt.number.fake_quant(weight, quantizer._amax, None, block_amax)
    assert torch.equal(quantizer(weight), expected) and not torch.equal(expected, weight)
    assert {b: quantizer.buffer_shape(b, weight) for b in fmt.number.buffer_shapes(fmt, weight)} == fmt.number.buffer_shapes(fmt, weight)
    assert quantizer._amax.shape == fmt.number.buffer_shapes(fmt, weight)["_amax"]


def test_a_configuration_the_format_cannot_have_is_refused():
    with pytest.raises(ValueError, match="not block-scaled"):
        QuantFormat("fp8", block_type="dynamic")
    with pytest.raises(ValueError, match="NVFP4 needs block_type"):
        QuantFormat("nvfp4", axis=0, block_type="dynamic")
    with pytest.raises(ValueError, match="unknown quantization format 'int8'"):
        QuantFormat("int8")
