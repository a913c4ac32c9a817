"""Grouped experts (`GroupedExperts`) against megatron's SequentialMLP on the same model: the same calibrated
amax, quantized logits and exported bytes, bit for bit, at TP/EP layouts of 2 and 4 ranks, with experts that
receive no token, static block amax and a global amax shared across experts; each role's quantizers working in
one pass or one launch per layer; NaN still caught; the same gradients (QAT), gated and not; what the grouped
forward cannot do run by SequentialMLP's."""

import filecmp
from pathlib import Path

import pytest
import torch

from dist_quant.parallel.spawn import run_ranks
from tests.distributed import grouped_workers, workers
from tests.distributed.workers import fitting

pytestmark = pytest.mark.xdist_group("grouped-experts")  # one worker computes the module's fixtures

LAYOUTS = fitting({"ep2": (2, 1, 2), "tp2": (2, 2, 1), "tp2xep2": (4, 2, 2)})  # world, TP, EP (ETP = TP)
BATCHES = 4  # calibration_case's forward loop
ROLES = 4  # fc1 input, fc1 weight, fc2 input, fc2 weight: each one launch per layer when quantizing


@pytest.mark.parametrize("layout", LAYOUTS)
def test_grouped_experts_calibrate_and_quantize_as_sequential_mlp(layout):
    world, tp, ep = LAYOUTS[layout]
    reports = run_ranks(world, grouped_workers.calibration_case, tp, ep, backend=workers.BACKEND)
    for report in reports:
        sequential, grouped = report["sequential"], report["grouped"]
        assert report["layers"] == 2
        # expert by expert, every live expert's quantizers were called; grouped, none, yet the two input roles
        # collected in one pass per layer and forward, and the four roles quantized in one launch per layer
        assert sequential["calibration_calls"] > 0 and sequential["one_pass"] == 0
        assert grouped["calibration_calls"] == 0 and grouped["one_pass"] == 2 * report["layers"] * BATCHES
        assert sequential["quantizing_calls"] > 0 and sequential["one_launch"] == 0
        assert grouped["quantizing_calls"] == 0 and grouped["one_launch"] == ROLES * report["layers"]
        assert sequential["state"].keys() == grouped["state"].keys()
        fc2_inputs = [k for k in grouped["state"] if "linear_fc2.input_quantizer._amax" in k]
        assert len(fc2_inputs) == grouped_workers.EXPERTS * 2
        live = [grouped["state"][k] for k in fc2_inputs if not any(f".local_experts.{e}." in k for e in workers.DEAD_EXPERTS)]
        assert len(set(float(v) for v in live)) > len(live) // 2  # the experts saw different tokens
        for key, value in sequential["state"].items():
            assert torch.equal(value, grouped["state"][key]), key
        assert torch.equal(sequential["logits"], grouped["logits"])
        assert report["in_memory"] == [True] * 2 * report["layers"]
        assert not report["in_memory_after_a_move"] and not report["stale_stack_kept"]
        assert torch.equal(report["logits_after_a_move"], grouped["logits"])


def test_nan_in_one_expert_input_is_reported_both_ways():
    errors = run_ranks(2, grouped_workers.nan_case, 1, 2, backend=workers.BACKEND)[0]
    for way, error in errors.items():
        assert "local_experts" in error and "NaN or Inf" in error, (way, error)


@pytest.mark.parametrize("layout", fitting({"ep2": (2, 1, 2), "tp2xep2": (4, 2, 2)}))
def test_grouped_experts_export_the_same_bytes(layout, tmp_path):
    world, tp, ep = LAYOUTS[layout]
    report = run_ranks(world, grouped_workers.export_case, tp, ep, str(tmp_path), backend=workers.BACKEND)[0]
    assert report["layers"] == 2
    sequential, grouped = report["sequential"], report["grouped"]
    for key, value in sequential["state"].items():
        assert torch.equal(value, grouped["state"][key]), key
    assert torch.equal(sequential["logits"], grouped["logits"])
    files = sorted(p.name for p in Path(sequential["export"]).iterdir())
    assert any(name.endswith(".safetensors") for name in files)
    assert files == sorted(p.name for p in Path(grouped["export"]).iterdir())
    _, mismatch, errors = filecmp.cmpfiles(sequential["export"], grouped["export"], files, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)


TRAINING = {
    "plain": (False, {}),
    "qat": (True, {}),
    "not gated": (False, {"gated_linear_unit": False, "activation_func": torch.nn.functional.gelu}),
    "clamped glu": (True, {"activation_func_clamp_value": 0.05, "glu_linear_offset": 1.0}),
    "expert biases": (False, {"add_bias_linear": True}),  # not grouped: SequentialMLP's forward
}


@pytest.fixture(scope="module")
def training():
    return run_ranks(2, grouped_workers.training_cases, 1, 2, TRAINING, backend=workers.BACKEND)


@pytest.mark.parametrize("variant", TRAINING)
def test_grouped_experts_train_as_sequential_mlp(training, variant):
    for report in training:
        case = report[variant]
        sequential, grouped = case["sequential"], case["grouped"]
        assert sequential["expert_modules_ran"]
        assert grouped["expert_modules_ran"] is (variant == "expert biases")
        assert torch.equal(sequential["logits"], grouped["logits"]) and torch.equal(sequential["loss"], grouped["loss"])
        assert sequential["grads"].keys() == grouped["grads"].keys()
        experts = [name for name in grouped["grads"] if ".local_experts." in name]
        assert len(experts) == case["expert_parameters"]  # every expert's own parameters got a gradient
        for name, grad in sequential["grads"].items():
            assert torch.equal(grad, grouped["grads"][name]), name
