"""MSE calibration: the FP8 scale sweep picks, per block, the scale fake quantization errs least with."""

import os

import pytest
import torch

from dist_quant import quantize
from dist_quant.kernels import nvfp4_mse_block_amax as dispatched_sweep
from dist_quant.numerics import fp8_scale_candidates, nvfp4_fake_quant, nvfp4_mse_block_amax
from dist_quant.numerics.mse import pairwise_block_sum
from tests.reference.data import spread
from tests.reference.hf import tiny_qwen3

interpreted = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="interpreted kernels run where there is no GPU"
)


def _student_t(gen, shape, dtype=torch.float32):
    x = torch.randn(shape, generator=gen)
    chi2 = torch.randn((3, *shape), generator=gen).square().sum(0)
    return (x / (chi2 / 3).sqrt()).to(dtype)  # Student-t, 3 degrees of freedom: heavy tails


def _block_errors(w, global_amax, block_amax):
    error = (nvfp4_fake_quant(w, global_amax, block_amax).float() - w.float()).reshape(*block_amax.shape, 16)
    return pairwise_block_sum(error * error)


def test_sweep_picks_the_scale_with_least_fake_quant_error_lowest_on_ties(gen):
    w = _student_t(gen, (8, 64))
    w[0, :16] = 0.0  # every candidate ties: the lowest must win
    g = w.abs().max() * 1.3  # a shared global amax above the weight's own
    chosen = nvfp4_mse_block_amax(w, g)
    # Brute force through fake quantization: every candidate as a static block amax c * g.
    candidates = fp8_scale_candidates() / torch.tensor(448.0)
    errors = torch.stack([_block_errors(w, g, torch.full_like(chosen, c.item()) * g) for c in candidates])
    best = errors.argmin(0)
    assert torch.equal(_block_errors(w, g, chosen), errors.min(0).values)
    assert torch.equal(chosen, candidates[best] * g) and chosen[0, 0] == candidates[0] * g


@pytest.mark.parametrize(
    "make", [lambda g, s: torch.randn(s, generator=g), lambda g, s: torch.rand(s, generator=g) - 0.5, spread, _student_t]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mse_never_worse_than_max_and_better_on_heavy_tails(gen, make, dtype):
    w = make(gen, (32, 128)).to(dtype)
    g = w.float().abs().max()
    by_mse = (nvfp4_fake_quant(w, g, nvfp4_mse_block_amax(w, g)).float() - w.float()).square().sum()
    by_max = (nvfp4_fake_quant(w, g).float() - w.float()).square().sum()
    assert by_mse <= by_max
    if make is _student_t:
        assert by_mse < 0.95 * by_max


@interpreted
@pytest.mark.parametrize(
    "shape, dtype", [((37, 48), torch.float32), ((4, 3, 160), torch.bfloat16), ((20, 256), torch.float16)]
)
def test_kernel_equals_reference_bit_for_bit(gen, monkeypatch, shape, dtype):
    # (37, 48): 111 blocks, one ragged program; (20, 256): 320 blocks over three programs.
    w = _student_t(gen, shape, dtype)
    g = w.float().abs().max()
    expected = nvfp4_mse_block_amax(w, g)
    monkeypatch.setenv("DIST_QUANT_BACKEND", "triton")
    assert torch.equal(dispatched_sweep(w, g), expected)


def test_bad_weights_raise_clear_errors():
    with pytest.raises(ValueError, match="NaN or Inf"):
        nvfp4_mse_block_amax(torch.tensor([[float("inf")] + [1.0] * 15]), 1.0)
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4_mse_block_amax(torch.ones(4, 24), 1.0)


def test_mse_recipe_sweeps_static_weights_with_the_shared_global_amax(gen):
    model = tiny_qwen3(gen)
    quantize(model, "nvfp4_mlp_only_mse-fp8_cast_kv", lambda m: m(torch.randint(0, 128, (2, 8), generator=gen)))
    mlp, attn = model.model.layers[0].mlp, model.model.layers[0].self_attn
    for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        q = linear.weight_quantizer
        assert torch.equal(q._block_amax, nvfp4_mse_block_amax(linear.weight, q.global_amax))
    assert torch.equal(mlp.gate_proj.weight_quantizer.global_amax, mlp.up_proj.weight_quantizer.global_amax)
    assert mlp.gate_proj.input_quantizer._block_amax is None  # dynamic activations are not swept
    assert not attn.q_proj.weight_quantizer.enabled


def test_experts_only_recipe_sweeps_every_expert_and_nothing_else(gen):
    from tests.unit.test_shared_states import Model

    torch.manual_seed(gen.initial_seed())
    model = Model()
    layer = model.model.layers[0]
    data = [torch.randn(4, 32, generator=gen)]
    quantize(model, "nvfp4_experts_only_mse-fp8_cast_kv", lambda m: [m(x) for x in data])
    for expert in layer.mlp.experts:
        gate, up = expert.gate_proj.weight_quantizer, expert.up_proj.weight_quantizer
        assert torch.equal(gate.global_amax, up.global_amax)
        for linear in (expert.gate_proj, expert.up_proj, expert.down_proj):
            q = linear.weight_quantizer
            assert torch.equal(q._block_amax, nvfp4_mse_block_amax(linear.weight, q.global_amax))
    assert not layer.mlp.gate_proj.weight_quantizer.enabled and not layer.self_attn.q_proj.weight_quantizer.enabled
