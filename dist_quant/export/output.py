"""Where a checkpoint is written, so that nothing is lost: the target must be a new path or an existing dist_quant
checkpoint (never the current directory, a mount point, the source checkpoint or a directory holding it); one run
at a time holds it (a lock file beside it, which names the runs whose temporaries may be left); files go to a
sibling `.partial` directory, checked for room before any work, and replace the target in one rename. The next run
finishes a commit that a killed run began and removes what it left, found by literal name from the lock's record,
never by pattern: nothing of another path or of a live run is touched."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import warnings
from pathlib import Path

from dist_quant.bridge.io import is_inside

PRODUCER = "dist_quant"
# A run's temporaries beside the target: the checkpoint being written, and the one a commit replaces
_PARTIAL, _OLD = ".{name}.partial-{pid}", ".{name}.old-{pid}"
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


class OutputError(RuntimeError):
    """The checkpoint cannot be written where asked; the message names the path."""


def is_dist_quant_checkpoint(directory: Path) -> bool:
    """A directory written by dist_quant: its hf_quant_config.json says so."""
    try:
        config = json.loads((directory / "hf_quant_config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and (config.get("producer") or {}).get("name") == PRODUCER


class OutputTarget:
    """The directory a checkpoint goes to. `protected`: paths it must neither be nor hold (the source)."""

    def __init__(self, path: str | os.PathLike, overwrite: bool = False, protected=()):
        self.path = Path(os.path.abspath(path))
        self.shown = str(path)  # as the user wrote it, for messages
        self.overwrite = overwrite
        self.protected = [Path(p).resolve() for p in protected if p is not None]
        self.partial: Path | None = None
        self._lock = None

    def problem(self) -> str | None:
        """Why the path cannot take the checkpoint, from the path alone; None when it can."""
        path, shown = self.path, self.shown
        if path.is_symlink():
            return f"{shown} is a symbolic link: give the directory it points to"
        if path.exists() and not path.is_dir():
            return f"{shown} exists and is not a directory"
        if path.exists() and not self.overwrite:
            return f"{shown} exists: pass --overwrite to replace it"
        real = path.resolve()
        if real == Path(real.anchor) or real == Path.home().resolve():
            return f"{shown} is the file system root or the home directory"
        if is_inside(Path.cwd().resolve(), real):
            return f"{shown} is the current directory or holds it"
        for source in self.protected:
            if is_inside(source, real):
                return f"{shown} is the source checkpoint {source} or holds it"
        if path.exists():
            if os.path.ismount(real):
                return f"{shown} is a mount point: write the checkpoint to a directory inside it"
            if not is_dist_quant_checkpoint(real):
                return f"{shown} exists and is not a dist_quant checkpoint (its hf_quant_config.json does not say so): not replacing it"
        return None

    def check(self) -> None:
        problem = self.problem()
        if problem:
            raise OutputError(problem)

    def claim(self, estimated_bytes: int = 0) -> Path:
        """Lock the target, remove what killed runs left, and make the partial directory, proving the file
        system takes writes; refuse when it lacks room for `estimated_bytes`. -> the partial directory."""
        self.check()
        parent, name = self.path.parent, self.path.name
        lock_path = parent / f".{name}.lock"
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self._lock = open(lock_path, "a+")
        except OSError as error:
            raise OutputError(f"{parent}: cannot write there ({error.strerror})") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # the lock file is removed on release: a file another run unlinked meanwhile is no lock
            held = os.fstat(self._lock.fileno()).st_ino == os.stat(lock_path).st_ino
        except (BlockingIOError, FileNotFoundError):
            held = False
        if not held:
            self._lock.close()
            self._lock = None
            raise OutputError(f"{self.path}: another run is writing it (it holds {lock_path})")
        # The runs the lock names are dead (none holds the lock): ours is recorded before their leftovers go, so
        # that a run killed while cleaning leaves them named for the next one.
        try:
            dead = self._recorded_runs()
            self._record_runs([*dead, os.getpid()])
            for pid in dead:
                self._finish(pid)
            self._record_runs([os.getpid()])
        except OSError as error:
            self.release()
            raise OutputError(f"{parent}: cannot clean up after an earlier run there ({error})") from None
        self.check()  # again, now that no other run can change it (and an interrupted commit is finished)
        free = shutil.disk_usage(parent).free
        if free < estimated_bytes:
            self.release()
            raise OutputError(
                f"{parent}: {free / 1e9:.2f} GB free, the checkpoint needs about {estimated_bytes / 1e9:.2f} GB"
            )
        self.partial, _ = self._temporaries(os.getpid())
        try:
            self.partial.mkdir()
        except OSError as error:
            self.release()
            raise OutputError(f"{parent}: cannot write there ({error.strerror})") from None
        return self.partial

    def _temporaries(self, pid: int) -> tuple[Path, Path]:
        """The partial directory of run `pid` on this path, and where its commit puts the checkpoint it replaces."""
        parent, name = self.path.parent, self.path.name
        return parent / _PARTIAL.format(name=name, pid=pid), parent / _OLD.format(name=name, pid=pid)

    def shown_in(self, message: str) -> str:
        """`message` with the partial directory of any run on this path named as the user named the target: the
        same words on every rank, also on those that did not claim it (which know no pid)."""
        partial = re.escape(str(self.path.parent / _PARTIAL.format(name=self.path.name, pid=""))) + r"\d+"
        return re.sub(partial, lambda _: self.shown, message)

    def _recorded_runs(self) -> list[int]:
        self._lock.seek(0)
        return [int(line) for line in self._lock.read().split() if line.isdigit()]

    def _record_runs(self, pids: list[int]) -> None:
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write("".join(f"{pid}\n" for pid in dict.fromkeys(pids)))
        self._lock.flush()
        os.fsync(self._lock.fileno())

    def _finish(self, pid: int) -> None:
        """Clean up after dead run `pid` of this path. Its `.old` directory exists only from the first rename of a
        commit without exchange, which begins once the verifier has passed the partial directory: killed before
        the second rename, the target is missing, and the finished checkpoint is put in its place (the old one,
        should the partial directory be gone)."""
        partial, old = self._temporaries(pid)
        if old.is_dir() and not os.path.lexists(self.path):
            finished = partial.is_dir()
            (partial if finished else old).rename(self.path)
            warnings.warn(
                f"{self.shown}: a run (process {pid}) was killed while replacing it; put back "
                + ("the checkpoint it had finished" if finished else "the checkpoint it was replacing")
            )
        for leftover in (partial, old):
            shutil.rmtree(leftover, ignore_errors=True)

    def commit(self) -> Path:
        """Put the partial directory in place of the target in one rename (an exchange when the target exists,
        so the old checkpoint stays whole until the new one is there), then drop the old one. Without exchange
        (NFS and others) two renames: the next run finishes a commit killed between them (`_finish`)."""
        if self.path.exists():
            if not _exchange(self.partial, self.path):
                _, old = self._temporaries(os.getpid())
                self.path.rename(old)
                try:
                    self.partial.rename(self.path)
                except OSError:
                    old.rename(self.path)
                    raise
                self.partial = old
            shutil.rmtree(self.partial)
        else:
            self.partial.rename(self.path)
        self.partial = None
        return self.path

    def release(self) -> None:
        """Drop the partial directory if it is still there (a failed export) and the lock."""
        if self.partial is not None and self.partial.exists():
            shutil.rmtree(self.partial, ignore_errors=True)
        self.partial = None
        if self._lock is not None:
            (self.path.parent / f".{self.path.name}.lock").unlink(missing_ok=True)
            self._lock.close()
            self._lock = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE). -> False where the system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS):  # file system or kernel without exchange
        return False
    raise OSError(code, os.strerror(code), str(b))
