"""A checkpoint laid out as huggingface_hub's cache holds a download, without the network: in
`CACHE/models--ORG--NAME/`, each file's content in `blobs/<its etag>`, the snapshot `snapshots/<revision>/` made of
relative links to them, and `refs/main` naming the revision. huggingface_hub's own lookup finds the snapshot."""

import hashlib
import os
from pathlib import Path


def cache_snapshot(cache: Path, repo_id: str, checkpoint: Path) -> Path:
    """Put the files of the directory `checkpoint` in the cache `cache` as the download of `repo_id`.
    -> the snapshot directory, as `huggingface_hub.snapshot_download` returns it."""
    from huggingface_hub import snapshot_download

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    revision = hashlib.sha1(repo_id.encode()).hexdigest()  # a commit hash's form
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in sorted(f for f in checkpoint.rglob("*") if f.is_file()):
        data = file.read_bytes()
        # a blob is named by its etag: the sha256 of a file stored in LFS (weights), git's blob hash of others
        etag = (
            hashlib.sha256(data).hexdigest() if file.suffix == ".safetensors"
            else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        )
        (repo / "blobs" / etag).write_bytes(data)
        link = snapshot / file.relative_to(checkpoint)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / etag, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    found = Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    assert found == snapshot, (found, snapshot)
    return snapshot
