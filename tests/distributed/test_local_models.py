"""Plain torch models are their rank's own: quantizing one never waits on other ranks."""

import pytest

from dist_quant.parallel.spawn import run_ranks
from tests.distributed import workers

pytestmark = pytest.mark.xdist_group("local-models")


@pytest.mark.parametrize("tp", [1, 2])
def test_quantizing_a_local_model_on_one_rank_starts_no_collective(tp):
    """A transformers model held by one rank (the refit target of the QAT example) is that rank's alone: no
    collective through megatron's groups or the world, which the other ranks would never join."""
    amax = run_ranks(2, workers.local_model_on_rank_0, tp, timeout=300)
    assert amax[0] > 0 and amax[1] is None
