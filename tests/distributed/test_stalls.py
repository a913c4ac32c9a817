"""A rank that stops answering, on real gloo ranks: the others' failed collective becomes one line naming it
(dist_quant.parallel.agree.stalls_named), or naming the error it stopped with. The ranks order their steps through
the group's store, so that nothing here depends on how long a step takes."""

import datetime

import torch
import torch.distributed as dist

from dist_quant.parallel.agree import RankError, stalls_named
from dist_quant.parallel.spawn import run_ranks

TIMEOUT = datetime.timedelta(seconds=3)
READY, DONE = "test/rank-1-ready", "test/rank-0-done"


def _collective_without_rank_1(rank_1_raises: bool):
    """Rank 0 joins a collective that rank 1 never joins. Rank 1 either waits for rank 0 to be done (hung, as
    far as rank 0 can tell) or raises an internal error first. -> on rank 0, what it raised and whether it is
    the one that tells the user."""
    store = dist.distributed_c10d._get_default_store()
    group = dist.new_group([0, 1], timeout=TIMEOUT)
    if dist.get_rank() == 1:
        if rank_1_raises:
            try:
                with stalls_named(TIMEOUT, ()):
                    raise ValueError("boom")
            except ValueError:
                pass
        store.set(READY, "")
        store.wait([DONE])
        return None
    store.wait([READY])
    try:
        with stalls_named(TIMEOUT, ()):
            dist.all_reduce(torch.ones(1), group=group)
    except RankError as error:
        return str(error), error.reporter
    finally:
        store.set(DONE, "")
    return "no error"


def test_a_rank_that_does_not_answer_is_named_with_the_timeout():
    assert run_ranks(2, _collective_without_rank_1, False)[0] == ("rank 1 did not answer within 0.05 minutes (stopped or hung?)", True)


def test_a_rank_that_stopped_with_an_error_is_named_with_its_error():
    told = ("rank 1: internal error ValueError: boom (its traceback is on that rank)", True)
    assert run_ranks(2, _collective_without_rank_1, True)[0] == told
