"""What ranks must agree on: every rank's value of something, and errors that happen on some ranks only, raised on
every rank at once, so no rank is left waiting in a collective for one that failed and the user sees the first
real error with the rank it happened on."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch.distributed as dist


class RankError(RuntimeError):
    """An error of one rank, raised on every rank as `rank N: message`."""


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
