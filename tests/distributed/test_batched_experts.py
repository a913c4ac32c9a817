"""An MoE layer's experts' quantizers work in one pass per layer: the fc1 input quantizers calibrate in one pass
over the layer's tokens, and quantizing (outside autograd) the fc1 inputs, the fc1 weights and the fc2 weights are
fake-quantized in one launch each. The same amax and the same quantized logits, bit for bit, as expert by expert,
with experts that receive no token, static block amax and a global amax shared across experts, over several
batches, at EP1 and EP2; NaN is still caught."""

import pytest
import torch

from dist_quant.parallel.spawn import run_ranks
from tests.distributed import workers

pytestmark = pytest.mark.xdist_group("batched-experts")  # one worker computes the module's fixtures


@pytest.mark.parametrize("ep", [1, 2])
def test_batched_experts_equal_per_expert_quantizers(ep):
    reports = run_ranks(ep, workers.batched_experts_case, ep, backend=workers.BACKEND)
    for report in reports:
        per_expert, batched = report[False], report[True]
        assert report["layers"] == 2
        # the per-expert way called every live expert's quantizers; the batched way none, yet collected, and
        # quantized in three launches per layer (fc1 inputs, fc1 weights, fc2 weights)
        assert per_expert["calibration_calls"] > 0 and not per_expert["collected"]
        assert batched["calibration_calls"] == 0 and batched["collected"]
        assert per_expert["quantizing_calls"] > 0 and per_expert["one_launch"] == 0
        assert batched["quantizing_calls"] == 0 and batched["one_launch"] == 3 * report["layers"]
        assert per_expert["state"].keys() == batched["state"].keys()
        fc1_inputs = [k for k in batched["state"] if "linear_fc1.input_quantizer" in k and "local_experts" in k]
        assert len(fc1_inputs) == workers.BATCHED_EXPERTS * 2
        live = [batched["state"][k] for k in fc1_inputs if not any(f".local_experts.{e}." in k for e in workers.DEAD_EXPERTS)]
        assert len(set(float(v) for v in live)) > len(live) // 2  # the experts saw different tokens
        for key, value in per_expert["state"].items():
            assert torch.equal(value, batched["state"][key]), key
        assert torch.equal(per_expert["logits"], batched["logits"])


def test_nan_in_one_expert_input_is_reported_by_the_batched_pass():
    report = run_ranks(2, workers.batched_experts_case, 2, True, backend=workers.BACKEND)[0]
    for way in (False, True):
        assert "local_experts" in report[way]["error"] and "NaN or Inf" in report[way]["error"], report[way]["error"]

