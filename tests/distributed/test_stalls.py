"""A rank that stops answering, on real gloo ranks: the others' failed collective becomes one line naming it
(dist_quant.parallel.agree.stalls_named), or naming the error it stopped with, or, when it answers after all,
saying that it was slower than the timeout. The ranks order their steps through the group's store, so that
nothing here depends on how long a step takes."""

import datetime

import torch
import torch.distributed as dist

from dist_quant.parallel.agree import _ANSWER, RankError, stalls_named
from dist_quant.parallel.spawn import run_ranks

TIMEOUT = datetime.timedelta(minutes=0.1)
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
    assert run_ranks(2, _collective_without_rank_1, False)[0] == ("rank 1 did not answer within 0.1 minutes (stopped or hung?)", True)


def test_a_rank_that_stopped_with_an_error_is_named_with_its_error():
    told = ("rank 1: internal error ValueError: boom (its traceback is on that rank)", True)
    assert run_ranks(2, _collective_without_rank_1, True)[0] == told


def _collectives_that_never_meet():
    """Rank 1 joins a collective of another group than rank 0's, which fails, and answers the roll call; only then
    does rank 0 join its own. -> on rank 0, what it raised."""
    store = dist.distributed_c10d._get_default_store()
    mine, other = dist.new_group([0, 1], timeout=TIMEOUT), dist.new_group([0, 1], timeout=TIMEOUT)
    if dist.get_rank() == 1:
        try:
            with stalls_named(TIMEOUT, ()):
                dist.all_reduce(torch.ones(1), group=other)
        except RankError:
            pass
        store.wait([DONE])
        return None
    store.wait([_ANSWER.format(rank=1)])
    try:
        with stalls_named(TIMEOUT, ()):
            dist.all_reduce(torch.ones(1), group=mine)
    except RankError as error:
        return str(error)
    finally:
        store.set(DONE, "")
    return "no error"


def test_a_rank_that_answers_after_all_was_slower_than_the_timeout():
    assert run_ranks(2, _collectives_that_never_meet)[0] == (
        "a collective gave up after 0.1 minutes while every rank was still running: a rank was slower than that "
        "(give --timeout more minutes)"
    )
