"""Where a checkpoint is written, so that nothing is lost: the target must be a new path or an existing dist_quant
checkpoint (never the current directory, a mount point, the source checkpoint or a directory holding it); one run
at a time holds it (a lock file beside it); files go to a sibling `.partial` directory, checked for room before
any work, and replace the target in one rename; what a killed run left behind is removed by the next."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
from pathlib import Path

from dist_quant.bridge.io import is_inside

PRODUCER = "dist_quant"
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
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self._lock = open(parent / f".{name}.lock", "a")
        except OSError as error:
            raise OutputError(f"{parent}: cannot write there ({error.strerror})") from None
        lock_path = parent / f".{name}.lock"
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
        self.check()  # again, now that no other run can change it
        for stale in [*parent.glob(f".{name}.partial-*"), *parent.glob(f".{name}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        free = shutil.disk_usage(parent).free
        if free < estimated_bytes:
            self.release()
            raise OutputError(
                f"{parent}: {free / 1e9:.2f} GB free, the checkpoint needs about {estimated_bytes / 1e9:.2f} GB"
            )
        self.partial = parent / f".{name}.partial-{os.getpid()}"
        try:
            self.partial.mkdir()
        except OSError as error:
            self.release()
            raise OutputError(f"{parent}: cannot write there ({error.strerror})") from None
        return self.partial

    def commit(self) -> Path:
        """Put the partial directory in place of the target in one rename (an exchange when the target exists,
        so the old checkpoint stays whole until the new one is there), then drop the old one."""
        if self.path.exists():
            if not _exchange(self.partial, self.path):
                old = self.path.parent / f".{self.path.name}.old-{os.getpid()}"
                self.path.rename(old)
                self.partial.rename(self.path)
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
