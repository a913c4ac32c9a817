"""Refit: a sharded Megatron model's weights and quantizer state streamed into a transformers model carrying
dist_quant quantizers, before and after a training step; and quantizer state restored at another layout."""

import re

import pytest
import torch

from dist_quant import load_recipe
from dist_quant.calibrate import attach_quantizers
from dist_quant.parallel.spawn import run_ranks
from dist_quant.refit import apply_refit
from tests.distributed import bridge_workers as workers
from tests.reference.tolerance import assert_equal_up_to_rounding, rounding_tolerance, transformer_roundings

pytestmark = pytest.mark.xdist_group("refit")  # one worker computes the module's fixtures


# Both sides hold bit-identical quantized weights and quantize bit-identical inputs the same way, so their logits
# differ by float rounding alone (the largest difference is ~2% of the tolerance). With fake-quantized
# activations a last-bit difference upstream could in principle flip one NVFP4 rounding; these fixed inputs have
# no element that close to a rounding boundary.
ROUNDINGS = transformer_roundings(workers.hf_config("qwen3")[0].to_dict(), workers.SEQ)
RECIPES = {"w4a16": workers.weight_only_recipe(), "w4a4": workers.w4a4_recipe()}
# name -> (architecture, world, TP, EP, PP, recipe). transformers keeps MoE experts fused in memory: the stream's
# per-expert tensors and quantizer state land in each expert's rows and quantizers (Mixtral's checkpoint names,
# block_sparse_moe.experts.E.w1/w2/w3, in its mlp.experts).
CASES = {
    "qwen3-tp2": ("qwen3", 2, 2, 1, 1, "w4a16"),
    "qwen3-pp2xtp2": ("qwen3", 4, 2, 1, 2, "w4a16"),
    **{
        f"{arch}-tp2xep2-{recipe}": (arch, 4, 2, 2, 1, recipe)
        for arch in ("qwen3_moe", "mixtral", "glm4_moe", "deepseek_v3") for recipe in RECIPES
    },
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("refit")
    checkpoints = workers.write_checkpoints(root)
    out = {}
    for case, (arch, world, tp, ep, pp, recipe) in CASES.items():
        path, state_dir = str(checkpoints[arch][0]), str(root / f"{case}-state")
        report = run_ranks(world, workers.refit_run, path, tp, ep, RECIPES[recipe], state_dir, pp)[0]
        out[case] = (path, RECIPES[recipe], state_dir, report)
    return out


def _hf_model(path, recipe):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    attach_quantizers(model, load_recipe(recipe))
    return model


def _hf_logits(model):
    with torch.no_grad():
        return model(workers.probe_tokens()).logits


@pytest.mark.parametrize("case", CASES)
def test_refit_reproduces_megatron_fake_quant_also_after_a_training_step(runs, case):
    path, recipe, _, report = runs[case]
    hf = _hf_model(path, recipe)
    counts = apply_refit(hf, report["stream"])
    assert counts == {"loaded": len(report["stream"]), "kv_cache_skipped": 0}
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
        ("qwen3-tp2", (1, 1, 1, 1)), ("qwen3_moe-tp2xep2-w4a16", (2, 1, 2, 1)),
        ("qwen3-pp2xtp2", (1, 1, 1, 1)), ("qwen3-pp2xtp2", (2, 2, 1, 1)), ("qwen3-tp2", (4, 2, 1, 2)),
        ("qwen3-tp2", (2, 1, 1, 2)),
    ],
    ids=["tp2-to-tp1", "tp2xep2-to-ep2", "pp2xtp2-to-pp1", "pp2xtp2-to-tp2", "tp2-to-pp2xtp2", "tp2-to-pp2"],
)
def test_quant_state_restores_into_another_layout(runs, case, layout):
    path, recipe, state_dir, report = runs[case]
    world, tp, ep, pp = layout
    logits = run_ranks(world, workers.restore_run, path, tp, ep, recipe, state_dir, pp)[0]
    assert_equal_up_to_rounding(logits, report["logits"], ROUNDINGS)


def test_quant_state_of_another_model_is_refused_before_anything_is_loaded(runs, tmp_path):
    import shutil

    qwen3_path, recipe, dense_state, _ = runs["qwen3-tp2"]
    moe_path = runs["qwen3_moe-tp2xep2-w4a16"][0]
    message = run_ranks(1, workers.restore_error, moe_path, 1, 1, recipe, dense_state)[0]
    assert "quantizers this model lacks" in message and "decoder.layers.0.mlp.linear_fc1" in message
    wider = tmp_path / "wider"  # the same names, one weight saved with another shape (another hidden size)
    shutil.copytree(dense_state, wider)
    for file in wider.glob("*.pt"):
        saved = torch.load(file, weights_only=True)
        saved["weights"]["decoder.layers.1.mlp.linear_fc2"] = (64, 256)
        torch.save(saved, file)
    message = run_ranks(1, workers.restore_error, qwen3_path, 1, 1, recipe, str(wider))[0]
    assert "decoder.layers.1.mlp.linear_fc2 has weight shape (64, 128) here, (64, 256) when saved" in message


def test_refit_into_a_model_with_fewer_experts_is_refused(runs):
    import transformers

    from dist_quant.refit import RefitError

    path, recipe, _, report = runs["qwen3_moe-tp2xep2-w4a16"]
    config = transformers.AutoConfig.from_pretrained(path)
    config.num_experts = 2
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    attach_quantizers(hf, load_recipe(recipe))
    with pytest.raises(RefitError, match=r"experts\.2\.(gate|up|down)_proj\.weight: the receiving model has 2 experts"):
        apply_refit(hf, report["stream"])


def _state(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def _unchanged(model, before):
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)


def _refused(runs, case, stream, match, hf=None, **kwargs):
    """apply_refit refuses `stream` with one line matching `match`, and the model is left as it was."""
    from dist_quant.refit import RefitError

    path, recipe, _, _ = runs[case]
    hf = hf or _hf_model(path, recipe)
    before = _state(hf)
    with pytest.raises(RefitError, match=match) as error:
        apply_refit(hf, stream, **kwargs)
    assert "\n" not in str(error.value) and _unchanged(hf, before)


def _changed(stream, name, change):
    return [(n, change(t) if n == name else t) for n, t in stream]


CASE = "qwen3_moe-tp2xep2-w4a16"
EXPERT_AMAX = "model.layers.1.mlp.experts.3.down_proj.weight_quantizer._amax"


def test_every_expert_is_loaded_and_quantized(runs):
    path, recipe, _, report = runs[CASE]
    hf = _hf_model(path, recipe)
    apply_refit(hf, report["stream"])
    stream = dict(report["stream"])
    experts = hf.model.layers[1].mlp.experts
    assert torch.equal(experts.down_proj[3], stream["model.layers.1.mlp.experts.3.down_proj.weight"])
    assert torch.equal(experts.gate_up_proj[2, 32:], stream["model.layers.1.mlp.experts.2.up_proj.weight"])
    quantizer = experts.get_submodule("3.down_proj.weight_quantizer")
    assert torch.equal(quantizer._amax, stream[EXPERT_AMAX]) and quantizer.mode.value == "quantizing"


def test_a_quantizer_the_receiving_recipe_disables_is_refused(runs):
    path, _, _, report = runs[CASE]
    attention_only = _hf_model(path, workers.weight_only_recipe(("*self_attn*",)))
    _refused(runs, CASE, report["stream"], r"experts\.0\.gate_proj\.weight_quantizer is disabled; attach the recipe", attention_only)


def test_a_partial_or_shorter_stream_is_refused_unless_asked_for(runs, tmp_path):
    import transformers

    path, recipe, _, report = runs[CASE]
    half = report["stream"][: len(report["stream"]) // 2]
    _refused(runs, CASE, half, r"leaves \d+ of the receiving model unset, e\.g\. .*all or nothing")
    hf = _hf_model(path, recipe)
    counts = apply_refit(hf, half, partial=True)
    assert counts["loaded"] == len(half)
    deeper = transformers.AutoConfig.from_pretrained(path)
    deeper.num_hidden_layers = 3
    hf = transformers.AutoModelForCausalLM.from_config(deeper).eval()
    attach_quantizers(hf, load_recipe(recipe))
    _refused(runs, CASE, report["stream"], r"unset, e\.g\. model\.layers\.2\.", hf)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda t: torch.full_like(t, float("nan")), r"an amax must be finite and not negative \(streamed nan\)"),
        (lambda t: -t, r"an amax must be finite and not negative \(streamed -"),
        (lambda t: t.reshape(1).repeat(4), r"streamed shape \(4,\), the receiving quantizer's is \(\)"),
    ],
    ids=["nan", "negative", "shape"],
)
def test_bad_amax_is_refused_before_anything_is_written(runs, change, match):
    stream = _changed(runs[CASE][3]["stream"], EXPERT_AMAX, change)
    _refused(runs, CASE, stream, f"{EXPERT_AMAX}: {match}")


def test_bad_weights_and_repeats_are_refused(runs):
    stream = runs[CASE][3]["stream"]
    name = "model.layers.1.mlp.experts.2.gate_proj.weight"
    _refused(runs, CASE, _changed(stream, name, lambda t: t.clone().index_fill_(0, torch.tensor([0]), float("inf"))), f"{name}: NaN or Inf")
    _refused(runs, CASE, stream + stream[-1:], f"{stream[-1][0]}: streamed twice")
    _refused(runs, CASE, _changed(stream, name, lambda t: t.to(torch.uint8)), "apply_refit takes the plain stream")


def test_kv_cache_amax_are_counted_not_applied(runs):
    path, recipe, _, report = runs[CASE]
    kv = [("model.layers.0.self_attn.k_bmm_quantizer._amax", torch.tensor(3.0))]
    counts = apply_refit(_hf_model(path, recipe), report["stream"] + kv)
    assert counts == {"loaded": len(report["stream"]), "kv_cache_skipped": 1}


def _edited_state(source, target, edit):
    """A copy of a saved quant state with edit(saved) applied to every rank's file."""
    import shutil

    shutil.copytree(source, target)
    for file in target.glob("*.pt"):
        saved = torch.load(file, weights_only=True)
        edit(saved)
        torch.save(saved, file)
    return str(target)


BLOCK_AMAX = "decoder.layers.0.mlp.linear_fc1.weight_quantizer._block_amax"
AMAX = "decoder.layers.0.self_attention.linear_qkv.weight_quantizer._amax"


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda saved: saved["state"][BLOCK_AMAX].update(split=(1, 1)), rf"{BLOCK_AMAX}: this rank's piece has shape \(128, 8\), the quantizer here takes \(256, 4\)"),
        (lambda saved: saved["state"][AMAX]["tensor"].fill_(float("nan")), f"{AMAX}: an amax must be finite and not negative"),
        (lambda saved: saved["state"][AMAX].update(tensor=torch.ones(3)), rf"{AMAX}: this rank's piece has shape \(3,\), the quantizer here takes \(\)"),
    ],
    ids=["split-lies", "nan", "shape"],
)
def test_restore_checks_every_piece_before_loading_any(runs, tmp_path, edit, match):
    """Saved state whose metadata or values are wrong is refused at the TP1 restore of a TP2 state (it used to
    report "restored" and fail later in the forward, or name the wrong problem)."""
    path, recipe, state_dir, _ = runs["qwen3-tp2"]
    edited = _edited_state(state_dir, tmp_path / "edited", edit)
    message = run_ranks(1, workers.restore_error, path, 1, 1, recipe, edited)[0]
    assert re.search(match, message), message
