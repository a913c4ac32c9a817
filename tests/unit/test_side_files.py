"""The side files (tokenizer, generation config, chat template) an export copies from its source: only the
checkpoint's own, the very files checked, written 0644; any other is refused with one line naming it."""

import os
import stat
import subprocess
import sys

import pytest

from dist_quant.export import ExportError
from dist_quant.export.side_files import copy_side_files
from tests.e2e.jobs import REPO
from tests.reference.hf_cache import cache_snapshot

TOKENIZER = b'{"version": "1.0", "model": {"type": "BPE"}}'


@pytest.fixture
def secret(tmp_path):
    """A private file of the user's, outside any checkpoint."""
    (tmp_path / "home" / ".ssh").mkdir(parents=True)
    key = tmp_path / "home" / ".ssh" / "id_rsa"
    key.write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    key.chmod(0o600)
    return key


def _source(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    (source / "tokenizer.json").write_bytes(TOKENIZER)
    return source


def _export(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    return export


@pytest.mark.parametrize("name", ["chat_template.jinja", "merges.txt", "vocab.json"])
@pytest.mark.parametrize("link", ["absolute", "relative"])
def test_a_side_file_linked_out_of_the_checkpoint_is_refused(tmp_path, secret, name, link):
    source, export = _source(tmp_path), _export(tmp_path)
    (source / name).symlink_to(secret if link == "absolute" else os.path.relpath(secret, source))
    with pytest.raises(ExportError) as refused:
        copy_side_files(source, export)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{source / name} is a link to {secret}, outside the checkpoint")
    assert not (export / name).exists()


def test_side_files_are_copied_0644_from_a_private_source(tmp_path):
    """A source readable by its owner alone; links inside the checkpoint are the checkpoint's own."""
    source, export = _source(tmp_path), _export(tmp_path)
    (source / "tokenizer.json").chmod(0o600)
    (source / "templates").mkdir()
    (source / "templates" / "chat.jinja").write_text("{{ messages }}")
    (source / "chat_template.jinja").symlink_to("templates/chat.jinja")
    copy_side_files(source, export)
    assert sorted(os.listdir(export)) == ["chat_template.jinja", "tokenizer.json"]
    assert (export / "tokenizer.json").read_bytes() == TOKENIZER
    assert (export / "chat_template.jinja").read_text() == "{{ messages }}"
    for file in export.iterdir():
        assert not file.is_symlink() and stat.S_IMODE(file.stat().st_mode) == 0o644


def test_the_side_files_of_a_hugging_face_cache_snapshot_are_copied(tmp_path):
    snapshot = cache_snapshot(tmp_path / "hub", "org/tiny", _source(tmp_path))
    export = _export(tmp_path)
    copy_side_files(snapshot, export)
    assert (export / "tokenizer.json").read_bytes() == TOKENIZER and not (export / "tokenizer.json").is_symlink()


def test_a_link_into_another_repository_of_the_cache_is_refused(tmp_path, secret):
    snapshot = cache_snapshot(tmp_path / "hub", "org/tiny", _source(tmp_path))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "vocab.json").write_text("{}")
    other = cache_snapshot(tmp_path / "hub", "org/other", tmp_path / "other")
    (snapshot / "vocab.json").symlink_to(os.path.relpath((other / "vocab.json").resolve(), snapshot))
    with pytest.raises(ExportError, match=r"vocab.json is a link to .*models--org--other/blobs/.*outside the checkpoint"):
        copy_side_files(snapshot, _export(tmp_path))


def test_a_side_file_that_is_no_regular_file_is_refused_without_waiting(tmp_path):
    """A FIFO would block a plain open until someone writes to it."""
    source, export = _source(tmp_path), _export(tmp_path)
    os.mkfifo(source / "tokenizer.model")
    with pytest.raises(ExportError, match=r"tokenizer.model: not a regular file"):
        copy_side_files(source, export)


# The copy in a process of its own, where an audit hook swaps a directory of the checked path for a link to the
# user's private directory just before the file is opened: what is opened is then checked, and refused.
_SWAPPED = """
import os, sys
from pathlib import Path
from dist_quant.export.side_files import copy_side_files
source, private, export = map(Path, sys.argv[1:])
checked = (source / "templates" / "chat.jinja").resolve()

def swap(event, args):
    if event == "open" and isinstance(args[0], (str, os.PathLike)) and Path(args[0]) == checked:
        (source / "templates").rename(source / "templates-checked")
        (source / "templates").symlink_to(private)

sys.addaudithook(swap)
copy_side_files(source, export)
"""


def test_a_directory_swapped_for_a_link_after_the_check_is_caught(tmp_path, secret):
    source, export = _source(tmp_path), _export(tmp_path)
    (source / "templates").mkdir()
    (source / "templates" / "chat.jinja").write_text("{{ messages }}")
    (source / "chat_template.jinja").symlink_to("templates/chat.jinja")
    (secret.parent / "chat.jinja").write_bytes(secret.read_bytes())  # the same name in the private directory
    result = subprocess.run([sys.executable, "-c", _SWAPPED, str(source), str(secret.parent), str(export)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert (source / "templates").is_symlink(), result.stderr[-3000:]  # the swap happened
    assert result.returncode != 0 and "ExportError" in result.stderr and "outside the checkpoint" in result.stderr
    assert not (export / "chat_template.jinja").exists()
