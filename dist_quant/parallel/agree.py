"""What ranks must agree on: every rank's value of something, and errors that happen on some ranks only, raised on
every rank at once, so no rank is left waiting in a collective for one that failed and the user sees the first
real error with the rank it happened on; and, when a rank stops answering, which one it is."""

from __future__ import annotations

import datetime
import time
from contextlib import contextmanager
from typing import Iterator

import torch.distributed as dist

# Store keys of the roll call after a failed collective: a rank's answer (empty, or the error it stopped with), and
# the count of ranks done with it (the first one done tells the user)
_ANSWER, _DONE = "dist_quant/roll-call/{rank}", "dist_quant/roll-call/done"
# How often a rank looks for the others' answers during a roll call
_ROLL_CALL_POLL_S = 0.1


class RankError(RuntimeError):
    """An error of one rank, raised on every rank as `rank N: message`. `reporter`: whether this rank is the one
    that tells the user (rank 0 unless said otherwise)."""

    def __init__(self, message: str, reporter: bool | None = None):
        super().__init__(message)
        self.reporter = (not dist.is_initialized() or dist.get_rank() == 0) if reporter is None else reporter


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def every_rank(value) -> list:
    """Every rank's `value` (any picklable object), in rank order. Collective over the world; [value] in a
    one-process world."""
    if _world() == 1:
        return [value]
    everyone = [None] * _world()
    dist.all_gather_object(everyone, value)
    return everyone


def first_error(message: str | None) -> tuple[int, str] | None:
    """Collective over the world: every rank passes its error message or None. -> (rank, message) of the lowest
    rank that has one, or None."""
    return next(((rank, m) for rank, m in enumerate(every_rank(message)) if m), None)


def with_rank(error: tuple[int, str]) -> str:
    """`rank N: message`, or the message alone in a one-process world."""
    rank, message = error
    return f"rank {rank}: {message}" if _world() > 1 else message


@contextmanager
def raised_together(user_errors: tuple[type[BaseException], ...]) -> Iterator[None]:
    """Run a block that holds no collective, then agree over the world on how it went: an error of the
    `user_errors` kinds on any rank becomes RankError with the first such message on every rank; an internal
    error keeps its traceback on its own rank, and the others raise RankError naming it."""
    error = None
    try:
        yield
    except Exception as caught:  # noqa: BLE001 - every failure must reach the agreement below
        error = caught
    user = isinstance(error, user_errors)
    if _world() == 1:
        if error is not None:
            raise error
        return
    message = None if error is None else (
        str(error) if user else f"internal error {type(error).__name__}: {error} (its traceback is on that rank)"
    )
    first = first_error(message)
    if error is not None and not user:
        raise error
    if first is not None:
        raise RankError(with_rank(first))


def is_collective_failure(error: BaseException) -> bool:
    """Whether `error` is a collective (or its store) that failed for want of a peer: it timed out waiting, or the
    peer's connection closed. gloo raises these as RuntimeError, its own source path in the message."""
    return isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and "/gloo/" in str(error))


@contextmanager
def stalls_named(timeout: datetime.timedelta, user_errors: tuple[type[BaseException], ...]) -> Iterator[None]:
    """Run a block of collectives so that a rank that stops answering (stopped, hung, gone) ends as one line on the
    ranks still running instead of a collective's traceback: a collective that fails there is followed by a roll
    call over the store, and becomes RankError naming the ranks that did not answer within `timeout`, or the
    error another rank stopped with, or, every rank answering, a rank slower than `timeout`. Any other error is
    left as it is, once announced for the others' roll call. The first rank done with the roll call is the
    RankError's reporter."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - every failure is announced to the others or named
        if _world() == 1:
            raise
        if not is_collective_failure(error):
            if not isinstance(error, RankError):  # a RankError is every rank's already
                _answer(with_rank((dist.get_rank(), str(error) if isinstance(error, user_errors) else _internal(error))))
            raise
        raise _roll_call(timeout) from error


def _internal(error: BaseException) -> str:
    return f"internal error {type(error).__name__}: {error} (its traceback is on that rank)"


def _answer(stopped_with: str) -> None:
    """Tell the roll call that this rank stopped with an error (a rank that cannot reach the store tells nothing)."""
    try:
        dist.distributed_c10d._get_default_store().set(_ANSWER.format(rank=dist.get_rank()), stopped_with)
    except dist.DistError:
        pass


def _roll_call(timeout: datetime.timedelta) -> RankError:
    """After a failed collective: answer, and wait up to `timeout` for every other rank's answer. -> the error that
    names the ranks that did not answer, or the first error a rank stopped with, or, when every rank answered
    without one, says that a rank was slower than the timeout."""
    me, world, minutes = dist.get_rank(), dist.get_world_size(), f"{timeout.total_seconds() / 60:g} minutes"
    # the group's store: torchrun's agent holds it, so it answers while any rank is stopped (private in torch,
    # which uses it the same way for its own barriers)
    store = dist.distributed_c10d._get_default_store()
    try:
        store.set(_ANSWER.format(rank=me), "")
        answers, deadline = {}, time.monotonic() + timeout.total_seconds()
        while True:
            for rank in range(world):
                if rank not in answers and store.check([_ANSWER.format(rank=rank)]):
                    answers[rank] = store.get(_ANSWER.format(rank=rank)).decode()
            if len(answers) == world or time.monotonic() >= deadline:
                break
            time.sleep(_ROLL_CALL_POLL_S)
        reporter = store.add(_DONE, 1) == 1
    except dist.DistError:  # the store is gone with the rank that held it (rank 0 outside torchrun)
        return RankError(f"a collective and the store did not answer within {minutes} (rank 0 stopped or hung?)", True)
    stopped = {rank: message for rank, message in answers.items() if message}
    if stopped:
        return RankError(stopped[min(stopped)], reporter)
    silent = [rank for rank in range(world) if rank not in answers]
    if not silent:
        return RankError(
            f"a collective gave up after {minutes} while every rank was still running: a rank was slower than that "
            "(give --timeout more minutes)", reporter,
        )
    names = f"rank {silent[0]}" if len(silent) == 1 else f"ranks {', '.join(map(str, silent))}"
    return RankError(f"{names} did not answer within {minutes} (stopped or hung?)", reporter)
