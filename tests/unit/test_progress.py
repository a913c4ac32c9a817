"""Progress: plain lines without carriage returns where stderr is no terminal, a bar closed before an error."""

import contextlib
import io

import pytest

from dist_quant import progress
from dist_quant.progress import Progress


class Terminal(io.StringIO):
    """What tqdm writes to a terminal, kept."""

    def isatty(self) -> bool:
        return True


def test_a_log_gets_lines_each_tenth_and_the_total_with_no_carriage_return(monkeypatch):
    monkeypatch.setattr(progress, "QUIET_INTERVAL", 0.0)
    monkeypatch.setattr(progress, "LOG_INTERVAL", 1e9)
    log = io.StringIO()
    with contextlib.redirect_stderr(log), Progress("exporting", "weights", 40) as bar:
        for _ in range(40):
            bar.update()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 10
    assert lines[0].startswith("exporting: 4/40 weights (10%), ") and "to go" in lines[0]
    assert lines[-1].startswith("exporting: 40/40 weights in ")


def test_lines_are_spaced_out_so_that_a_fast_stage_prints_its_total_alone(monkeypatch):
    monkeypatch.setattr(progress, "QUIET_INTERVAL", 1e9)  # every report comes sooner than that after the last line
    monkeypatch.setattr(progress, "LOG_INTERVAL", 1e9)
    log = io.StringIO()
    with contextlib.redirect_stderr(log), Progress("reading weights", "tensors") as bar:
        for done in range(1, 6):
            bar.at(done, 5)  # the callback form: the total comes with the first report
    assert log.getvalue().startswith("reading weights: 5/5 tensors in ") and log.getvalue().count("\n") == 1


def test_nothing_where_disabled_or_empty():
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        with Progress("calibrating", "batches", 3, enabled=False) as bar:
            bar.update(3)
        with Progress("calibrating", "batches", 0) as bar:
            bar.update(0)
    assert log.getvalue() == ""


def test_an_error_starts_on_its_own_line_after_a_bar():
    terminal = Terminal()
    with contextlib.redirect_stderr(terminal), pytest.raises(RuntimeError):
        with Progress("exporting", "weights", 10) as bar:
            bar.update(3)
            raise RuntimeError("verification failed")
    assert "3/10" in terminal.getvalue() and terminal.getvalue().endswith("\n")
