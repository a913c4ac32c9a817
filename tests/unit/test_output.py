"""Where a checkpoint is written: what the next run does with what a killed run left, and that it never touches
another path's work. Killed runs are real processes killed with SIGKILL at the step named."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dist_quant.export import OutputError, OutputTarget
from dist_quant.export.output import PRODUCER
from tests.e2e.jobs import REPO

# A run of OutputTarget in a process of its own that writes CONTENT into its partial directory and commits it,
# killed with SIGKILL at KILL_AT: once claimed, or (by an audit hook) as the commit reaches that operation. Without exchange, it runs as on a
# C library without renameat2 (the commit's path for file systems without RENAME_EXCHANGE, such as NFS).
_RUN = """
import json, os, signal, sys
from pathlib import Path
out, content, kill_at, exchange = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "exchange"

def hook(event, args):
    if event == "ctypes.dlsym" and args[1] == "renameat2" and not exchange:
        raise AttributeError("renameat2")
    if kill_at == "second rename" and event == "os.rename" and os.fspath(args[1]) == out:
        os.kill(os.getpid(), signal.SIGKILL)
    if kill_at == "dropping the old" and event == "shutil.rmtree":
        os.kill(os.getpid(), signal.SIGKILL)

from dist_quant.export.output import OutputTarget, PRODUCER
target = OutputTarget(out, overwrite=True)
partial = target.claim()
(partial / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": PRODUCER}, "content": content}))
if kill_at == "claimed":
    os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(hook)
target.commit()
"""


def _killed_run(out: Path, content: str, kill_at: str, exchange: bool = False) -> int:
    """Run _RUN until the kill. -> the killed process's id."""
    process = subprocess.Popen(
        [sys.executable, "-c", _RUN, str(out), content, kill_at, "exchange" if exchange else "no-exchange"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL, stderr[-3000:]
    return process.pid


def _checkpoint(path: Path, content: str) -> Path:
    """A directory that passes for a dist_quant checkpoint, told apart by `content`."""
    path.mkdir(parents=True)
    (path / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": PRODUCER}, "content": content}))
    return path


def _content(path: Path) -> str:
    return json.loads((path / "hf_quant_config.json").read_text())["content"]


def test_cleanup_never_takes_the_out_name_as_a_pattern(tmp_path):
    """`--out 'conc/ck[1]'` and `--out '*'` name those literal paths: another run's work on conc/ck1 (running
    or not) is not theirs."""
    running = OutputTarget(tmp_path / "ck1")
    running_partial = running.claim()
    (running_partial / "model-00001-of-00001.safetensors").write_bytes(b"being written")
    other = _checkpoint(tmp_path / ".other.old-7", "another path's previous checkpoint")
    try:
        for name in ("ck[1]", "*", "ck?"):
            target = OutputTarget(tmp_path / name)
            target.claim()
            target.release()
        assert (running_partial / "model-00001-of-00001.safetensors").read_bytes() == b"being written"
        assert _content(other) == "another path's previous checkpoint"
    finally:
        running.release()


def test_a_dead_runs_leftovers_go_and_nothing_the_lock_does_not_name(tmp_path):
    out = tmp_path / "out"
    dead = _killed_run(out, "unfinished", "claimed")
    assert (tmp_path / f".out.partial-{dead}").is_dir()
    unnamed = _checkpoint(tmp_path / ".out.partial-1", "not made by a run the lock names")
    target = OutputTarget(out)
    target.claim()
    try:
        assert (tmp_path / ".out.lock").read_text() == f"{os.getpid()}\n"
        assert not (tmp_path / f".out.partial-{dead}").exists() and _content(unnamed) == "not made by a run the lock names"
    finally:
        target.release()


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_a_run_killed_after_its_commit_leaves_the_new_checkpoint(tmp_path, exchange):
    out = _checkpoint(tmp_path / "out", "previous")
    _killed_run(out, "new", "dropping the old", exchange)
    target = OutputTarget(out, overwrite=True)
    target.claim()
    target.release()
    assert _content(out) == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_commit_killed_between_its_two_renames_is_finished_by_the_next_run(tmp_path):
    """Without RENAME_EXCHANGE the commit moves the previous checkpoint aside, then the new one in: killed in
    between, neither is at `out`. The next run puts the finished (verified) one there, and without --overwrite
    then refuses to replace it."""
    out = _checkpoint(tmp_path / "out", "previous")
    dead = _killed_run(out, "new", "second rename")
    assert not out.exists() and _content(tmp_path / f".out.old-{dead}") == "previous"
    target = OutputTarget(out)
    with pytest.raises(OutputError, match="exists: pass --overwrite to replace it"), pytest.warns(
        UserWarning, match=rf"out: a run \(process {dead}\) was killed while replacing it; put back the checkpoint it had finished"
    ):
        target.claim()
    target.release()
    assert _content(out) == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
