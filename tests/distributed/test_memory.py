"""What keeps calibration's memory near the weights', without changing what it computes: megatron's local
attention a few sequences at a time for large batches, and no logits held by a loop that reads none."""

import pytest
import torch

from dist_quant.parallel.spawn import run_ranks
from tests.distributed import workers
from tests.distributed.workers import BACKEND
from tests.reference.tolerance import assert_equal_up_to_rounding

pytestmark = pytest.mark.xdist_group("memory")  # one worker computes the module's fixtures


@pytest.fixture(scope="module")
def report():
    return run_ranks(1, workers.memory_savers_case, backend=BACKEND)[0]


def test_attention_a_sequence_at_a_time_gives_the_batched_logits(report):
    whole, per_sequence = report["logits"]
    assert whole.shape[0] == workers.BATCH > 1
    assert_equal_up_to_rounding(per_sequence, whole, workers.FORWARD_ROUNDINGS)


def test_a_loop_that_discards_the_logits_keeps_none_and_calibrates_the_same(report):
    assert report["outputs, discarded True"] == [] and len(report["outputs, discarded False"]) == 2
    kept, discarded = report["state, discarded False"], report["state, discarded True"]
    assert kept.keys() == discarded.keys() and any("output_layer.input_quantizer" in k for k in kept)
    differing = [k for k in kept if not torch.equal(kept[k], discarded[k])]
    assert not differing, differing[:5]
