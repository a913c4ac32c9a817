"""Real faults in the ranks of a real job, for tests/e2e/test_reliability.py. Python imports this module first in
every process started with this directory on PYTHONPATH (its `sitecustomize`); DIST_QUANT_TEST_FAULT=KIND:RANK
then acts in rank RANK as it opens a checkpoint shard to write it:

- `full-disk`: the shard is made a link to /dev/full, where every write fails with ENOSPC, as on a full disk;
- `stop`: the rank sends itself SIGSTOP, as a rank that stalls.
"""

import os
import signal
import sys


def _at_shard_write(kind: str, rank: str):
    def hook(event, args):
        if event != "open" or os.environ.get("RANK") != rank or not isinstance(args[0], (str, os.PathLike)):
            return
        path, mode = os.fspath(args[0]), args[1]
        if path.endswith(".safetensors") and isinstance(mode, str) and "w" in mode:
            if kind == "full-disk" and not os.path.lexists(path):
                os.symlink("/dev/full", path)
            elif kind == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)

    return hook


if os.environ.get("DIST_QUANT_TEST_FAULT"):
    sys.addaudithook(_at_shard_write(*os.environ["DIST_QUANT_TEST_FAULT"].split(":")))
