"""The files a checkpoint carries beside its weights (tokenizer, generation config, chat template), copied from
the source checkpoint into the export (docs/checkpoint.md). A source checkpoint is often someone else's files and
the export is made to be shared: a side file is copied only when it is the checkpoint's own (a regular file inside
it, or a Hugging Face cache snapshot's link into its repository's blobs: `is_checkpoint_file`), so that a link
such as `chat_template.jinja -> ~/.ssh/id_rsa` is refused instead of copying a private file into the export. A
refused file is an error, not a skipped file: an export without its tokenizer would surface only when served."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from dist_quant.bridge.io import is_checkpoint_file
from dist_quant.export.problems import ExportError

SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "vocab.json",
    "merges.txt", "generation_config.json", "chat_template.jinja",
)
_MODE = 0o644  # the export is for others to read, whatever the source's mode


def check_side_files(source_dir: str | os.PathLike) -> list[Path]:
    """The side files `source_dir` holds. ExportError naming the first that is not the checkpoint's own."""
    source, present = Path(source_dir), []
    for name in SIDE_FILES:
        path = source / name
        if os.path.lexists(path):
            if not is_checkpoint_file(path, source):
                raise ExportError(
                    f"{path} is a link to {path.resolve()}, outside the checkpoint: not copying it into the export "
                    "(put the file itself there if it belongs to the model)"
                )
            present.append(path)
    return present


def copy_side_files(source_dir: str | os.PathLike, directory: Path) -> None:
    """Copy the side files of `source_dir` into `directory`, mode 0644, each the very file checked (see `_read`)."""
    for path in check_side_files(source_dir):
        data = _read(path, Path(source_dir))
        descriptor = os.open(directory / path.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _MODE)
        try:
            os.fchmod(descriptor, _MODE)  # the umask may have taken bits away
            with os.fdopen(descriptor, "wb", closefd=False) as file:
                file.write(data)
            written = os.fstat(descriptor).st_size
        finally:
            os.close(descriptor)
        if written != len(data):
            raise ExportError(f"{directory / path.name}: {written} bytes written of {len(data)}")


def _read(path: Path, source: Path) -> bytes:
    """The content of side file `path`, read once. What is read is what was checked: the file is opened at its
    resolved path without following a last link, and the path the open descriptor has is checked again (a
    directory on the way swapped for a link in between is caught); it must be a regular file (opened without
    blocking: a FIFO would hang the export) that did not change while read."""
    try:
        descriptor = os.open(path.resolve(), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as error:
        raise ExportError(f"{path}: cannot read it ({error.strerror})") from None
    try:
        opened = Path(os.readlink(f"/proc/self/fd/{descriptor}"))
        if not is_checkpoint_file(opened, source):
            raise ExportError(f"{path}: opened as {opened}, outside the checkpoint: not copying it into the export")
        before = os.fstat(descriptor)
        if not stat.S_ISREG(before.st_mode):
            raise ExportError(f"{path}: not a regular file")
        with os.fdopen(descriptor, "rb", closefd=False) as file:
            data = file.read()
        after = os.fstat(descriptor)
    finally:
        os.close(descriptor)
    if len(data) != before.st_size or (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise ExportError(f"{path}: changed while it was read; copy the checkpoint again when nothing writes it")
    return data
