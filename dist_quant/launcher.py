"""`dist-quant launch`: the job's ranks on this machine, started by torch's elastic launcher as `torchrun
--standalone` starts them, ending as the job ends alone: one line per failure and exit status 2.

Under torchrun a failed job exits 1 and torchrun's 50-line report follows the job's line, and once one rank has
failed torchrun ends the others, whether or not they have told the user anything yet. Here every rank leaves its
error line in the error file the elastic agent gives it (TORCHELASTIC_ERROR_FILE, which torchrun's report reads
too) instead of printing it, and the launcher prints one, once every rank has ended. torchrun's report (and its
log) are for `--verbose`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import uuid

# Set for the ranks `dist-quant launch` starts: they leave their error line to it
LAUNCHED = "DIST_QUANT_LAUNCHED"
# Python's exit status for an uncaught exception: a rank's internal error, its traceback printed
_TRACEBACK_STATUS = 1


def record_error(message: str) -> None:
    """Leave this rank's error line where the elastic agent looks for it, in the form of torch's own error files
    (nothing outside torchrun's agent)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with open(path, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": {"timestamp": str(int(time.time()))}}}, f)


def launch(nproc_per_node: int, job: list[str], verbose: bool = False) -> int:
    """Run `dist-quant JOB` (e.g. calibrate ...) on `nproc_per_node` local ranks, with torchrun --standalone's
    rendezvous (a store on a free port). -> the exit status: 0, 2 when the job failed with its one line, 1 for an
    internal error or a rank killed; the line printed on stderr."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if not verbose:  # the agent logs every rank it ends and every failure: the line below says what matters
        for name in ("torch.distributed.elastic", "torch.distributed.launcher"):
            # its loggers set levels of their own: only cutting their way to torch's handler quiets them
            quiet = logging.getLogger(name)
            quiet.addHandler(logging.NullHandler())
            quiet.propagate = False
    if nproc_per_node > 1:  # as torchrun: one thread per rank unless told otherwise
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ[LAUNCHED] = "1"
    stop = threading.Event()
    watcher = threading.Thread(target=_continue_stopped_ranks_told_to_end, args=(stop,), daemon=True)
    watcher.start()
    try:
        with tempfile.TemporaryDirectory(prefix="dist_quant-launch-") as logs:
            config = LaunchConfig(
                min_nodes=1, max_nodes=1, nproc_per_node=nproc_per_node, run_id=str(uuid.uuid4()),
                rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                logs_specs=DefaultLogsSpecs(log_dir=logs),
            )
            elastic_launch(config, sys.executable)("-u", "-m", "dist_quant.cli", *job)
    except ChildFailedError as error:
        if verbose:
            print(error.format_msg(), file=sys.stderr)
        line, status = _verdict(error.failures)
        print(f"dist-quant: error: {line}", file=sys.stderr, flush=True)
        return status
    except SignalException as error:  # the launcher was told to end (Ctrl-C, SIGTERM): so were the ranks
        return 128 + error.sigval
    finally:
        stop.set()
        del os.environ[LAUNCHED]
    return 0


def _verdict(failures: dict) -> tuple[str, int]:
    """The line and exit status of a failed job from its ranks' failures (elastic's ProcessFailure by rank): the
    first line a rank left, else what ended the rank that failed first. Ranks ended with SIGTERM come last: the
    agent ends every rank that is left that way, within the second (elastic's timestamps) of the first failure."""
    # a rank exits 2 once its line is in its error file (cli.main), which elastic reads as a dict
    told = sorted(
        (f.timestamp, rank, f.message["message"]) for rank, f in failures.items()
        if f.exitcode == 2 and isinstance(f.message, dict)
    )
    internal = any(f.exitcode == _TRACEBACK_STATUS for f in failures.values())
    if told:
        return told[0][2], _TRACEBACK_STATUS if internal else 2
    rank, failure = min(
        failures.items(), key=lambda item: (item[1].exitcode == -signal.SIGTERM, item[1].timestamp, item[0])
    )
    if failure.exitcode < 0:
        return f"rank {rank} was killed by {failure.signal_name()}", 1
    traceback = " (its traceback is above)" if failure.exitcode == _TRACEBACK_STATUS else ""
    return f"rank {rank} exited with status {failure.exitcode}{traceback}", 1


def _continue_stopped_ranks_told_to_end(stop: threading.Event) -> None:
    """torch's agent ends the ranks of a failed job with SIGTERM and waits 30 s before SIGKILL (hard-coded where it
    polls the ranks, whatever its shutdown_timeout), and a stopped rank takes no SIGTERM until it is continued:
    continue a stopped rank once it has a SIGTERM pending, so that it ends at once. waitid with WNOWAIT finds a
    stopped child without taking its status from the agent."""
    while not stop.wait(0.1):
        try:
            stopped = os.waitid(os.P_ALL, 0, os.WSTOPPED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # no rank yet, or none left
            continue
        if stopped is not None and _sigterm_pending(stopped.si_pid):
            os.kill(stopped.si_pid, signal.SIGCONT)


def _sigterm_pending(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            pending = next(line.split()[1] for line in f if line.startswith("ShdPnd:"))
    except (OSError, StopIteration):
        return False
    return bool(int(pending, 16) & 1 << (signal.SIGTERM - 1))
