"""quantize() on plain torch models: attach by recipe, calibrate over a forward loop, fake quant, QAT, restore."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_quant import load_recipe, quantize
from dist_quant.calibrate import CalibrationError, attach_quantizers, promote
from dist_quant.numerics import fp8_fake_quant, nvfp4_fake_quant
from dist_quant.recipe import RecipeError
from tests.reference.data import spread


class TinyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.up_proj = nn.Linear(32, 64)
        self.down_proj = nn.Linear(64, 32, bias=False)
        self.lm_head = nn.Linear(32, 48, bias=False)

    def forward(self, x):
        return self.lm_head(self.down_proj(torch.relu(self.up_proj(x))))


def _model_and_data(gen):
    torch.manual_seed(gen.initial_seed())
    return TinyBlock(), [spread(gen, (4, 32)) for _ in range(3)]


def _forward_loop(data):
    return lambda model: [model(x) for x in data]


def test_fp8_quantize_matches_the_formula_and_leaves_excluded_layers_alone(gen):
    model, data = _model_and_data(gen)
    plain_up = model.up_proj.weight.detach().clone()
    quantize(model, "fp8_default-fp8_cast_kv", _forward_loop(data))
    input_amax = max(x.abs().max() for x in data)
    assert model.up_proj.input_quantizer._amax == input_amax
    x = data[0]
    expected_up = F.linear(fp8_fake_quant(x, input_amax), fp8_fake_quant(plain_up, plain_up.abs().max()), model.up_proj.bias)
    assert torch.equal(model.up_proj(x), expected_up)
    assert not model.lm_head.weight_quantizer.enabled and not model.lm_head.input_quantizer.enabled
    assert torch.equal(model.lm_head(x), F.linear(x, model.lm_head.weight))


def test_nvfp4_quantize_and_qat_gradients_flow(gen):
    model, data = _model_and_data(gen)
    quantize(model, "nvfp4_default-fp8_cast_kv", _forward_loop(data))
    w = model.down_proj.weight
    assert torch.equal(model.down_proj.weight_quantizer(w), nvfp4_fake_quant(w, w.abs().max()))
    loss = model(data[0]).square().mean()
    loss.backward()
    assert model.up_proj.weight.grad is not None and model.up_proj.weight.grad.abs().sum() > 0


def test_restore_into_a_fresh_model_with_strict_loading(gen):
    model, data = _model_and_data(gen)
    quantize(model, "nvfp4_default-fp8_kv", _forward_loop(data))
    fresh = TinyBlock()
    attach_quantizers(fresh, load_recipe("nvfp4_default-fp8_kv"))
    fresh.load_state_dict(model.state_dict(), strict=True)
    promote(fresh)
    assert torch.equal(fresh(data[1]), model(data[1]))


def test_weight_only_recipe_needs_no_forward_loop(gen):
    model, data = _model_and_data(gen)
    recipe = {"quantize": {"quant_cfg": [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": "e4m3", "axis": 0}},
    ]}}
    quantize(model, recipe)
    assert model.up_proj.weight_quantizer._amax.shape == (64, 1)
    assert torch.equal(model.up_proj.weight_quantizer._amax, model.up_proj.weight.detach().abs().amax(1, keepdim=True))


def test_calibration_errors_name_the_quantizers(gen):
    model, data = _model_and_data(gen)
    with pytest.raises(CalibrationError, match="pass forward_loop"):
        quantize(model, "nvfp4_default-fp8_cast_kv")
    model, data = _model_and_data(gen)
    with pytest.raises(CalibrationError, match="1 activation quantizers saw no calibration data on any rank: down_proj.input_quantizer"):
        quantize(model, "nvfp4_default-fp8_cast_kv", lambda m: m.up_proj(data[0]))
    model, data = _model_and_data(gen)
    data[1][2, 5] = float("nan")
    with pytest.raises(CalibrationError, match="NaN or Inf: amax of down_proj.input_quantizer, up_proj.input_quantizer is not finite"):
        quantize(model, "nvfp4_default-fp8_cast_kv", _forward_loop(data))


def test_a_recipe_that_quantizes_nothing_here_is_an_error(gen):
    model, _ = _model_and_data(gen)
    with pytest.raises(RecipeError, match="enables no quantizer in this model"):
        quantize(model, "nvfp4_experts_only_mse-fp8_cast_kv")


def test_static_blocks_on_activations_are_rejected(gen):
    model, _ = _model_and_data(gen)
    recipe = {"quantize": {"quant_cfg": [
        {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": "e2m1", "block_sizes": {-1: 16, "type": "static"}}},
    ]}}
    with pytest.raises(RecipeError, match="static NVFP4 blocks and per-channel axes apply to weights only"):
        quantize(model, recipe, _forward_loop([]))


def test_quantizers_are_made_on_the_models_device():
    """A constant amax is set when the quantizer is made: it must not land on the CPU beside a GPU model (the
    meta device stands in for one here)."""
    model = TinyBlock().to("meta")
    constant = {"num_bits": "e4m3", "use_constant_amax": True}
    attach_quantizers(model, load_recipe({"quantize": {"quant_cfg": [{"quantizer_name": "*input_quantizer", "cfg": constant}]}}))
    buffers = [(n, b) for n, b in model.named_buffers() if b is not None]
    assert [n for n, _ in buffers] == [f"{m}.input_quantizer._amax" for m in ("up_proj", "down_proj", "lm_head")]
    assert all(b.device.type == "meta" for _, b in buffers)


def test_nvfp4_on_a_width_that_is_not_a_multiple_of_16_is_refused_at_attach():
    model = nn.Sequential(nn.Linear(10, 20))
    with pytest.raises(RecipeError, match=r"0.input_quantizer: NVFP4 needs a last dimension that is a multiple of 16; this layer's is 10"):
        quantize(model, "nvfp4_default-fp8_cast_kv", lambda m: m(torch.randn(2, 10)))


def test_activations_that_are_all_zero_are_told_apart_from_no_data():
    model = nn.Sequential(nn.Linear(16, 16))
    with pytest.raises(CalibrationError, match=r"1 activation quantizers saw only zeros: 0.input_quantizer"):
        quantize(model, "fp8_default-fp8_cast_kv", lambda m: m(torch.zeros(2, 16)))
    with pytest.raises(CalibrationError, match=r"saw no calibration data on any rank: 0.input_quantizer"):
        quantize(nn.Sequential(nn.Linear(16, 16)), "fp8_default-fp8_cast_kv", lambda m: None)
