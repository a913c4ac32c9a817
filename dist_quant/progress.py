"""Progress of the job's stages on stderr: on a terminal a tqdm bar with its total and ETA; anywhere else (a log
file, a pipe) plain lines with the count, the time so far and the time to go, at most one each tenth of the way
(none sooner than QUIET_INTERVAL after the last, at least one every LOG_INTERVAL) and one at the end, with no
carriage returns. A bar is closed before anything else is printed, an error above all, so that every
message starts on a line of its own."""

from __future__ import annotations

import sys
import time

LOG_INTERVAL = 30.0  # seconds: the longest a log goes without a line while a stage runs
QUIET_INTERVAL = 2.0  # seconds: the shortest between a log's lines before the end (a fast stage prints one)
_STEPS = 10  # a log's lines each tenth of the total, at most


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def say(message: str, enabled: bool = True) -> None:
    """A stage line (what starts, what it took)."""
    if enabled:
        print(message, file=sys.stderr, flush=True)


class Progress:
    """Units of work counted by `update`, or reported as `at(done, total)` by a callback; shown only where
    `enabled` (rank 0). `total` may come with the first report. A context manager that closes it however the
    block ends."""

    def __init__(self, desc: str, unit: str, total: int | None = None, enabled: bool = True):
        self.desc, self.unit, self.total, self.enabled = desc, unit, total, enabled
        self.done = 0
        self.started = self.last_line = time.perf_counter()
        self.stream = sys.stderr
        self.bar = None

    def at(self, done: int, total: int) -> None:
        """The callback form: `done` of `total` so far."""
        self.total = total
        self.update(done - self.done)

    def update(self, count: int = 1) -> None:
        if not self.enabled or not self.total or count <= 0:
            return
        before, self.done = self.done, self.done + count
        if self.stream.isatty():
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=self.total, desc=self.desc, unit=self.unit, file=self.stream, dynamic_ncols=True)
            self.bar.update(count)
            return
        now = time.perf_counter()
        step = self.total / _STEPS
        since = now - self.last_line
        if self.done >= self.total or (int(self.done / step) > int(before / step) and since >= QUIET_INTERVAL) or since >= LOG_INTERVAL:
            self.last_line = now
            print(self._line(now - self.started), file=self.stream, flush=True)

    def _line(self, elapsed: float) -> str:
        if self.done >= self.total:
            return f"{self.desc}: {self.done}/{self.total} {self.unit} in {duration(elapsed)}"
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        return (
            f"{self.desc}: {self.done}/{self.total} {self.unit} ({100 * self.done // self.total}%), "
            f"{duration(elapsed)} so far, about {duration(eta)} to go"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.enabled = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
