"""Calibration of sharded megatron-core models on real gloo groups does not depend on the parallel layout.

Every layout is built from one set of full weights, written by the TP1/EP1 reference run, and calibrated on the
same data; results are compared in logical (unsharded) names.
"""

import re

import pytest
import torch

from tests.distributed import workers
from tests.distributed.workers import BACKEND
from tests.reference.tolerance import assert_equal_up_to_rounding, rounding_tolerance
from dist_quant.parallel.spawn import run_ranks

pytestmark = pytest.mark.xdist_group("layout-invariance")  # one worker computes the module's fixtures

# name -> (world size, TP, EP, ETP, each DP rank gets its own share of the data)
LAYOUTS = workers.fitting({
    "tp2": (2, 2, 1, None, False),
    "ep2": (2, 1, 2, None, False),
    "tp2xep2": (4, 2, 2, None, False),
    "tp2xep2-etp1": (4, 2, 2, 1, False),
    "dp2-split-data": (2, 1, 1, None, True),
})
# The layout that also counts sync collectives and bootstraps dead experts: the widest one that fits.
WIDEST = "tp2xep2" if "tp2xep2" in LAYOUTS else "ep2"
MODELS = ("dense", "moe")


@pytest.fixture(scope="module")
def full_weights(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("weights") / "full.pt")
    return path, run_ranks(1, workers.reference, path, backend=BACKEND)[0]


@pytest.fixture(scope="module")
def reference(full_weights):
    return full_weights[1]


@pytest.fixture(scope="module")
def layout_reports(full_weights):
    path, _ = full_weights
    reports = {}
    for name, (world, tp, ep, etp, split) in LAYOUTS.items():
        ranks = run_ranks(world, workers.run_layout, tp, ep, etp, path, split, name == WIDEST, backend=BACKEND)
        reports[name] = ranks[0]
        for other in ranks[1:]:  # every rank assembled the same logical state
            for kind in MODELS:
                assert other[kind]["state"].keys() == ranks[0][kind]["state"].keys()
    return reports


def _is_weight(key: str) -> bool:
    return ".weight_quantizer." in key


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_weight_derived_amax_is_bit_identical(reference, layout_reports, layout, kind):
    expected, actual = reference[kind]["state"], layout_reports[layout][kind]["state"]
    assert actual.keys() == expected.keys()
    weights = [k for k in expected if _is_weight(k)]
    granularities = {k.rsplit(".", 1)[1] for k in weights} | {"per-channel" for k in weights if expected[k].dim() == 2 and expected[k].shape[1] == 1}
    assert {"_amax", "_block_amax", "per-channel"} <= granularities
    differing = [k for k in weights if not torch.equal(actual[k], expected[k])]
    assert not differing, differing[:5]


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_activation_and_kv_amax_agree_to_rounding(reference, layout_reports, layout, kind):
    """Sharded layouts sum in other orders: activations agree to their rounding, which grows with the forward."""
    expected, actual = reference[kind]["state"], layout_reports[layout][kind]["state"]
    activations = [k for k in expected if not _is_weight(k)]
    assert any("k_bmm" in k for k in activations) and any("input_quantizer" in k for k in activations)
    for key in activations:
        assert expected[key] > 0
        assert_equal_up_to_rounding(actual[key], expected[key], workers.FORWARD_ROUNDINGS, msg=key)


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_quantized_logits_match_the_unsharded_model(reference, layout_reports, layout, kind):
    expected, actual = reference[kind], layout_reports[layout][kind]
    plain_error = (actual["logits"] - expected["logits"]).abs().max().item()
    # Weight fake quant is bit-identical across layouts: the sharded forward only sums in another order.
    weights_error = (actual["weight_quantized_logits"] - expected["weight_quantized_logits"]).abs().max().item()
    floor = rounding_tolerance(expected["weight_quantized_logits"], workers.FORWARD_ROUNDINGS)
    assert weights_error <= max(4 * plain_error, floor), (weights_error, plain_error)
    assert not torch.equal(expected["weight_quantized_logits"], expected["logits"])  # quantization did something
    # NVFP4 activations round at discontinuities: a last-bit difference of the sharded sums (and of the activation
    # amax, equal to 1e-6 only) can flip a rounding, so whole logits agree to within a few quantization steps.
    full_error = (actual["quantized_logits"] - expected["quantized_logits"]).abs().max().item()
    assert full_error <= 0.05 * expected["quantized_logits"].abs().max().item(), full_error


@pytest.mark.parametrize("layout", [None, *LAYOUTS])
def test_experts_fc1_share_one_global_amax_across_ep_ranks(reference, layout_reports, layout):
    state = (reference if layout is None else layout_reports[layout])["moe"]["state"]
    for layer in (0, 1):
        prefix = f"decoder.layers.{layer}.mlp.experts.local_experts"
        own = [state[f"{prefix}.{e}.linear_fc1.weight_quantizer._amax"] for e in range(workers.EXPERTS)]
        shared = [state[f"{prefix}.{e}.linear_fc1.weight_quantizer._global_amax"] for e in range(workers.EXPERTS)]
        assert all(torch.equal(s, max(own)) for s in shared) and min(own) < max(own)
        assert f"{prefix}.0.linear_fc2.weight_quantizer._global_amax" not in state


def test_one_sync_is_one_all_reduce_per_process_group(layout_reports):
    counts = layout_reports[WIDEST]["sync"]
    small, large = counts[1], counts[4]
    assert large["quantizers"] > 3 * small["quantizers"]
    # One MAX all-reduce per reduction domain, plus one world-wide flag that makes errors collective.
    assert small["collectives"] == large["collectives"] == small["domains"] + 1
    assert small["domains"] >= (3 if WIDEST == "tp2xep2" else 1)  # at EP2 only activations of dense parts reduce


def test_experts_that_get_no_tokens_are_bootstrapped_from_their_siblings(layout_reports):
    report = layout_reports[WIDEST]["dead_experts"]
    state = report["state"]
    assert all(torch.isfinite(v).all() and (v > 0).all() for v in state.values())
    for e in range(workers.EXPERTS):  # dead or alive, every expert's weights were swept
        for linear in ("linear_fc1", "linear_fc2"):
            assert f"decoder.layers.0.mlp.experts.local_experts.{e}.{linear}.weight_quantizer._block_amax" in state
    for layer in (0, 1):
        for linear in ("linear_fc1", "linear_fc2"):
            amax = {
                e: state[f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.{linear}.input_quantizer._amax"]
                for e in range(workers.EXPERTS)
            }
            alive = max(amax[e] for e in range(workers.EXPERTS) if e not in workers.DEAD_EXPERTS)
            for e in workers.DEAD_EXPERTS:
                assert torch.equal(amax[e], alive), (layer, linear, e)
    assert report["warnings"] and re.match(r"\d+ expert activation quantizers", report["warnings"][0])


def test_bad_input_fails_on_every_rank_with_a_clear_error():
    messages = run_ranks(2, workers.error_cases, backend=BACKEND)
    for rank_messages in messages:
        assert "world size 2 cannot hold TP=2, PP=1, EP=2, ETP=2" in rank_messages["world"]
        assert "calibration data held NaN or Inf" in rank_messages["nan"]
        assert "decoder.layers.1.self_attention.linear_proj.input_quantizer" in rank_messages["nan"]  # NaN made on rank 1 only
        assert "enables no quantizer in this model" in rank_messages["recipe"]


def test_nan_in_an_expert_of_one_rank_is_named_on_every_rank():
    for message in run_ranks(2, workers.expert_nan_case, backend=BACKEND):
        assert message.endswith("amax of decoder.layers.1.mlp.experts.local_experts.2.linear_fc2.input_quantizer (on rank 1) is not finite"), message


def test_an_expert_layer_that_sees_only_zeros_says_so():
    for message in run_ranks(2, workers.zero_expert_layer_case, backend=BACKEND):
        assert "every expert of decoder.layers.1.mlp.experts.linear_fc2.input_quantizer saw only zeros" in message, message


def test_collectives_on_reduction_domains_time_out_as_asked():
    waited = run_ranks(2, workers.timeout_case, 2.0)[0]
    assert isinstance(waited, float) and 1.5 < waited < 6, waited
