"""Refit: a sharded Megatron model's weights and quantizer state streamed into a transformers model carrying
dist_quant quantizers, before and after a training step; and quantizer state restored at another layout."""

import pytest
import torch

from dist_quant import load_recipe
from dist_quant.calibrate import attach_quantizers
from dist_quant.parallel.spawn import run_ranks
from dist_quant.refit import apply_refit
from tests.distributed import bridge_workers as workers
from tests.reference.tolerance import assert_equal_up_to_rounding, rounding_tolerance, transformer_roundings

pytestmark = pytest.mark.xdist_group("refit")  # one worker computes the module's fixtures
# Weight-only fake quant: both sides hold bit-identical quantized weights, so their logits differ by float
# rounding alone. Fake-quantized activations would not: a last-bit difference between two implementations can
# flip an NVFP4 rounding.
ROUNDINGS = transformer_roundings(workers.hf_config("qwen3")[0].to_dict(), workers.SEQ)
# name -> (architecture, world, TP, EP, PP, quantized scope)
CASES = {
    "qwen3-tp2": ("qwen3", 2, 2, 1, 1, ("*",)),
    "qwen3-pp2xtp2": ("qwen3", 4, 2, 1, 2, ("*",)),
    # transformers keeps MoE experts fused in memory: the stream's per-expert tensors land in gate_up_proj /
    # down_proj slices. Experts there are not nn.Linear, so only attention is quantized in this case.
    "qwen3_moe-tp2xep2": ("qwen3_moe", 4, 2, 2, 1, ("*self_attention*", "*self_attn*")),
    # Mixtral's checkpoint names (block_sparse_moe.experts.E.w1/w2/w3) land in transformers 5's fused mlp.experts
    "mixtral-tp2xep2": ("mixtral", 4, 2, 2, 1, ("*self_attention*", "*self_attn*")),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("refit")
    checkpoints = workers.write_checkpoints(root)
    out = {}
    for case, (arch, world, tp, ep, pp, scope) in CASES.items():
        path, state_dir = str(checkpoints[arch][0]), str(root / f"{case}-state")
        out[case] = (path, scope, state_dir, run_ranks(world, workers.refit_run, path, tp, ep, scope, state_dir, pp)[0])
    return out


def _hf_model(path, scope):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    attach_quantizers(model, load_recipe(workers.weight_only_recipe(scope)))
    return model


def _hf_logits(model):
    with torch.no_grad():
        return model(workers.probe_tokens()).logits


@pytest.mark.parametrize("case", CASES)
def test_refit_reproduces_megatron_fake_quant_also_after_a_training_step(runs, case):
    path, scope, _, report = runs[case]
    hf = _hf_model(path, scope)
    counts = apply_refit(hf, report["stream"])
    assert counts["loaded"] > 0 and hf.model.layers[0].self_attn.q_proj.weight_quantizer._block_amax is not None
    assert_equal_up_to_rounding(_hf_logits(hf), report["logits"], ROUNDINGS)
    apply_refit(hf, report["stepped_stream"])
    assert_equal_up_to_rounding(_hf_logits(hf), report["stepped_logits"], ROUNDINGS)
    # the step changed the logits far more than rounding does: the second refit was needed to agree
    assert (report["stepped_logits"] - report["logits"]).abs().max() > 100 * rounding_tolerance(report["logits"], ROUNDINGS)


def test_quantized_refit_streams_checkpoint_tensors(runs):
    names = set(runs["qwen3-tp2"][3]["quantized_names"])
    assert {"model.layers.1.mlp.up_proj.weight_scale", "model.layers.1.mlp.up_proj.weight_scale_2", "lm_head.weight"} <= names
    assert not any("_quantizer" in n for n in names)


@pytest.mark.parametrize(
    "case, layout",
    [
        ("qwen3-tp2", (1, 1, 1, 1)), ("qwen3_moe-tp2xep2", (2, 1, 2, 1)),
        ("qwen3-pp2xtp2", (1, 1, 1, 1)), ("qwen3-pp2xtp2", (2, 2, 1, 1)), ("qwen3-tp2", (4, 2, 1, 2)),
        ("qwen3-tp2", (2, 1, 1, 2)),
    ],
    ids=["tp2-to-tp1", "tp2xep2-to-ep2", "pp2xtp2-to-pp1", "pp2xtp2-to-tp2", "tp2-to-pp2xtp2", "tp2-to-pp2"],
)
def test_quant_state_restores_into_another_layout(runs, case, layout):
    path, scope, state_dir, report = runs[case]
    world, tp, ep, pp = layout
    logits = run_ranks(world, workers.restore_run, path, tp, ep, scope, state_dir, pp)[0]
    assert_equal_up_to_rounding(logits, report["logits"], ROUNDINGS)


def test_quant_state_of_another_model_is_refused_before_anything_is_loaded(runs, tmp_path):
    import shutil

    qwen3_path, scope, dense_state, _ = runs["qwen3-tp2"]
    moe_path = runs["qwen3_moe-tp2xep2"][0]
    message = run_ranks(1, workers.restore_error, moe_path, 1, 1, scope, dense_state)[0]
    assert "quantizers this model lacks" in message and "decoder.layers.0.mlp.linear_fc1" in message
    wider = tmp_path / "wider"  # the same names, one weight saved with another shape (another hidden size)
    shutil.copytree(dense_state, wider)
    for file in wider.glob("*.pt"):
        saved = torch.load(file, weights_only=True)
        saved["weights"]["decoder.layers.1.mlp.linear_fc2"] = (64, 256)
        torch.save(saved, file)
    message = run_ranks(1, workers.restore_error, qwen3_path, 1, 1, scope, str(wider))[0]
    assert "decoder.layers.1.mlp.linear_fc2 has weight shape (64, 128) here, (64, 256) when saved" in message


def test_refit_into_a_model_with_fewer_experts_is_refused(runs):
    import transformers

    from dist_quant.refit import RefitError

    path, scope, _, report = runs["qwen3_moe-tp2xep2"]
    config = transformers.AutoConfig.from_pretrained(path)
    config.num_experts = 2
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    attach_quantizers(hf, load_recipe(workers.weight_only_recipe(scope)))
    with pytest.raises(RefitError, match=r"experts\.2\.(gate|up|down)_proj\.weight: the receiving model has 2 experts"):
        apply_refit(hf, report["stream"])
