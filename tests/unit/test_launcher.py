"""`dist-quant launch`'s verdict on a failed job, from the failures torch's elastic agent records (its own
ProcessFailure, reading the error files the ranks leave): the line to print and the exit status."""

import signal

from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from dist_quant.launcher import _verdict, record_error


def _failure(tmp_path, monkeypatch, rank: int, exitcode: int, line: str | None = None) -> ProcessFailure:
    """Rank `rank`'s failure as the agent records it, with `line` left in its error file (None: no file)."""
    error_file = tmp_path / f"{rank}.json"
    if line is not None:
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
        record_error(line)
    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file=str(error_file))


def test_the_line_a_rank_left_is_told_with_exit_status_2(tmp_path, monkeypatch):
    failures = {
        0: _failure(tmp_path, monkeypatch, 0, -signal.SIGTERM),  # ended by the agent: the line is rank 1's
        1: _failure(tmp_path, monkeypatch, 1, 2, "rank 0 did not answer within 0.1 minutes (stopped or hung?)"),
    }
    assert _verdict(failures) == ("rank 0 did not answer within 0.1 minutes (stopped or hung?)", 2)


def test_an_internal_error_on_any_rank_is_exit_status_1(tmp_path, monkeypatch):
    line = "rank 1: internal error KeyError: 'x' (its traceback is on that rank)"
    failures = {0: _failure(tmp_path, monkeypatch, 0, 2, line), 1: _failure(tmp_path, monkeypatch, 1, 1)}
    assert _verdict(failures) == (line, 1)
    assert _verdict({1: failures[1]}) == ("rank 1 exited with status 1 (its traceback is above)", 1)


def test_a_killed_rank_is_named_not_the_ranks_the_agent_ended_after_it(tmp_path, monkeypatch):
    failures = {rank: _failure(tmp_path, monkeypatch, rank, -signal.SIGTERM) for rank in (0, 1, 3)}
    failures[2] = _failure(tmp_path, monkeypatch, 2, -signal.SIGKILL)  # the out-of-memory killer's, say
    assert _verdict(failures) == ("rank 2 was killed by SIGKILL", 1)
