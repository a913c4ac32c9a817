"""Number formats as objects (docs/formats.md): what a format writes into a checkpoint is what it declares (the
layout the verifier checks), its recipe spellings select it, and a quantizer configured with it fake-quantizes
through it."""

import pytest
import torch

from dist_quant.formats import FORMATS, SPELLINGS, STATIC, QuantFormat, select
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


SELECTIONS = [  # (num_bits, block_sizes, the format a recipe cfg with them asks for)
    ("e4m3", None, "fp8"), (8, None, "fp8"),
    ("e4m3", {-1: 128, -2: 128}, "fp8_block"), ("e4m3", {-1: 128, "type": "dynamic"}, "fp8_block"),
    ("e4m3", {-1: 32, "type": "dynamic", "scale_bits": "e8m0"}, "mxfp8"),
    ("e2m1", {-1: 16, "type": "dynamic", "scale_bits": "e4m3"}, "nvfp4"), ("e2m1", {-1: 16}, "nvfp4"), (4, None, "nvfp4"),
    ("e2m1", {-1: 32, "type": "dynamic", "scale_bits": "e8m0"}, "mxfp4"),
]


@pytest.mark.parametrize("num_bits, blocks, expected", SELECTIONS, ids=str)
def test_a_recipe_cfg_selects_one_format_by_its_bits_and_blocks(num_bits, blocks, expected):
    chosen = [name for name, number in FORMATS.items() if number.selects(num_bits, blocks)]
    assert chosen[:1] == [select(num_bits, blocks).name] == [expected]
    assert num_bits in SPELLINGS and select("e5m2", None) is None


@pytest.mark.parametrize("fmt", [
    QuantFormat("fp8"), QuantFormat("fp8", axis=0), QuantFormat("nvfp4", block_type="dynamic"),
    QuantFormat("nvfp4", block_type=STATIC), QuantFormat("mxfp8", block_type="dynamic"), QuantFormat("mxfp4", block_type="dynamic"),
    QuantFormat("fp8_block", block_type="dynamic", block_shape=(128, 128)), QuantFormat("fp8_block", block_type="dynamic", block_shape=(128,)),
], ids=lambda f: f.describe())
def test_a_quantizer_fake_quantizes_through_its_format(fmt):
    weight = torch.randn(32, 128, generator=torch.Generator().manual_seed(2))
    quantizer = TensorQuantizer(fmt)
    quantizer.calibrate_from(weight)
    quantizer.mode = QuantizerMode.QUANTIZING
    block_amax = quantizer._block_amax if fmt.block_type == STATIC else None
    expected = fmt.number.fake_quant(fmt, weight, quantizer._amax, None, block_amax)
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
