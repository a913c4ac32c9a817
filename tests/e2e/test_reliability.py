"""The job under bad inputs, faults and attacks: no hang, no lost data, no code run from files, the real error
of any rank reported once as one line."""

import os
import re
import shutil
import stat

import pytest
import torch

from dist_quant.export import OutputError, OutputTarget, verify
from dist_quant.export.side_files import SIDE_FILES
from dist_quant.job import replica_samples
from tests.e2e.jobs import calibrate_on_ranks, launch, run_cli, run_python, tiny_qwen3_moe
from tests.reference.hf_cache import cache_snapshot

TINY = ("--model", "tiny-qwen3-moe", "--recipe", "fp8_default-fp8_cast_kv", "--seq-len", "16")


def _one_line_error(result, text):
    lines = [line for line in result.stderr.splitlines() if line.startswith("dist-quant: error:")]
    assert result.returncode != 0 and len(lines) == 1 and text in lines[0], result.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("count, replicas", [(17, 2), (3, 2), (1, 2), (5, 4), (8, 4)])
def test_every_replica_gets_as_many_samples_and_all_are_covered(count, replicas):
    shares = [replica_samples(count, r, replicas) for r in range(replicas)]
    assert len({len(share) for share in shares}) == 1
    assert set().union(*shares) == set(range(count))


@pytest.mark.parametrize("samples, batch", [(3, 1), (1, 1)], ids=["uneven", "one-sample"])
def test_uneven_samples_over_expert_parallel_replicas_finish(tmp_path, samples, batch):
    """EP2 on 2 ranks: the MoE token exchange spans both data-parallel replicas, so they must take as many steps."""
    result = calibrate_on_ranks(2, *TINY, "--ep", "2", "--calib-samples", str(samples), "--batch-size", str(batch),
                                "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    verify(tmp_path / "out")


@pytest.mark.parametrize(
    "damage, text",
    [
        ("missing", "the checkpoint lacks model.layers.0.mlp.experts.3.up_proj.weight, which config.json describes"),
        ("nan", "rank 1: model.layers.0.mlp.experts.3.gate_proj.weight, model.layers.0.mlp.experts.3.up_proj.weight: NaN or Inf"),
    ],
)
def test_an_error_of_any_rank_reaches_the_user_once(tmp_path, damage, text):
    """Expert 3 is held by EP rank 1: a missing tensor is seen by every rank's check of the checkpoint, NaN only
    where the expert is read."""
    from safetensors.torch import load_file, save_file

    source = tiny_qwen3_moe(tmp_path / "source", torch.float32)
    tensors = load_file(source / "model.safetensors")
    name = "model.layers.0.mlp.experts.3.up_proj.weight"
    if damage == "missing":
        tensors.pop(name)
    else:
        tensors[name][0, 0] = float("nan")
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    result = calibrate_on_ranks(2, "--hf-model", str(source), "--recipe", "fp8_default-fp8_cast_kv", "--ep", "2",
                                "--out", str(tmp_path / "out"))
    _one_line_error(result, text)
    assert "Connection closed" not in result.stderr and not (tmp_path / "out").exists()


def _last_line_alone(result, line):
    """The job ended with `line`, its only error line, after no traceback of any rank's and no launcher's log."""
    assert result.stderr.splitlines()[-1] == line and result.stderr.count("dist-quant: error:") == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Connection closed" not in result.stderr, result.stderr[-3000:]
    assert not re.search(r"(?m)^[IWE]\d{4} ", result.stderr), result.stderr[-3000:]  # torch's log lines


@pytest.mark.parametrize("writers, full", [("one", 0), ("all", 1)], ids=["rank-0-writes-all", "every-rank-writes"])
def test_a_full_disk_ends_the_job_in_one_line_and_leaves_nothing(tmp_path, writers, full):
    """A real ENOSPC (the rank's first shard is /dev/full) in the background writer of the rank that writes it:
    the other rank, still in the export's collectives, is not left waiting for it, and both stop with its line."""
    out = tmp_path / "out"
    result = launch(2, *TINY, "--ep", "2", "--calib-samples", "2", "--export-writers", writers, "--out", str(out),
                    fault=("full-disk", full))
    assert result.returncode == 2, result.stderr[-3000:]
    _last_line_alone(result, f"dist-quant: error: rank {full}: no space left on device writing {out}/shard-r{full:05d}-00000.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_stopped_rank_is_named_within_the_timeout(tmp_path):
    """Rank 0 (which holds the output's lock) receives SIGSTOP as it writes its first shard: rank 1 waits
    --timeout minutes for it in a collective, and as long again for its answer, and names it; the launcher ends
    the stopped rank at once and, with --verbose, keeps torchrun's report before the line. (--timeout: 15 s, more
    than a rank of a loaded machine falls behind another before the fault, where the job would fail otherwise.)"""
    result = launch(2, *TINY, "--ep", "2", "--calib-samples", "2", "--export-writers", "all", "--timeout", "0.25",
                    "--out", str(tmp_path / "out"), verbose=True, fault=("stop", 0), timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    report = result.stderr[result.stderr.index("dist_quant.cli FAILED"):]
    assert "exitcode  : -15" in report and "Root Cause (first observed failure)" in report, report
    line = "dist-quant: error: rank 0 did not answer within 0.25 minutes (stopped or hung?)"
    assert result.stderr.splitlines()[-1] == line and result.stderr.count("dist-quant: error:") == 1, result.stderr[-3000:]
    assert "Timed out waiting" not in result.stderr and not (tmp_path / "out").exists()


def test_a_side_file_linked_out_of_the_checkpoint_is_refused_before_any_work(tmp_path):
    """`ln -s ~/.ssh/id_rsa SRC/chat_template.jinja`: the export, made to be shared, would hold the key."""
    source = tiny_qwen3_moe(tmp_path / "source", torch.float32)
    secret = tmp_path / "home" / ".ssh" / "id_rsa"
    secret.parent.mkdir(parents=True)
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----")
    secret.chmod(0o600)
    (source / "chat_template.jinja").unlink(missing_ok=True)  # the tokenizer's, when it has one
    (source / "chat_template.jinja").symlink_to(secret)
    result = run_cli("calibrate", "--hf-model", str(source), "--recipe", "fp8_default-fp8_cast_kv", "--out",
                     str(tmp_path / "out"))
    text = f"{source / 'chat_template.jinja'} is a link to {secret}, outside the checkpoint"
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and text in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_a_sharded_checkpoint_in_the_hugging_face_cache_is_calibrated_as_downloaded(tmp_path):
    """huggingface_hub's layout: the snapshot's files, side files included, are links into the repository's blobs."""
    import transformers

    source, sharded = tiny_qwen3_moe(tmp_path / "source", torch.float32), tmp_path / "sharded"
    transformers.AutoModelForCausalLM.from_pretrained(source).save_pretrained(sharded, max_shard_size="300KB")
    for file in source.iterdir():  # the tokenizer and generation config
        if not (sharded / file.name).exists():
            shutil.copy(file, sharded)
    snapshot = cache_snapshot(tmp_path / "hub", "org/tiny-qwen3-moe", sharded)
    assert (snapshot / "model.safetensors.index.json").is_symlink() and (snapshot / "generation_config.json").is_symlink()
    result = calibrate_on_ranks(1, "--hf-model", str(snapshot), "--recipe", "fp8_default-fp8_cast_kv",
                                "--calib-samples", "2", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    verify(tmp_path / "out")
    for name in {f.name for f in snapshot.iterdir()} & set(SIDE_FILES):
        copied = tmp_path / "out" / name
        assert not copied.is_symlink() and copied.read_bytes() == (snapshot / name).read_bytes(), name


def test_out_is_never_the_current_directory_a_mount_a_source_or_foreign_data(tmp_path):
    source = tiny_qwen3_moe(tmp_path / "source", torch.float32)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"meow")
    link = tmp_path / "link"
    link.symlink_to(foreign)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    cases = {
        ".": "--out . is the current directory or holds it",
        str(source): "is the source checkpoint",
        str(tmp_path): "is the source checkpoint",  # a parent of the source
        str(foreign): "exists and is not a dist_quant checkpoint",
        str(link): "is a symbolic link",
        str(a_file): "exists and is not a directory",
        **({"/dev/shm": "is a mount point"} if os.path.ismount("/dev/shm") else {}),
    }
    for out, text in cases.items():
        result = run_cli("calibrate", "--hf-model", str(source), "--recipe", "fp8_default-fp8_cast_kv", "--out", out,
                         "--overwrite")
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and text in result.stderr, (out, result.stderr)
    assert (foreign / "cat.jpg").read_bytes() == b"meow" and a_file.read_text() == "keep me"


def test_overwrite_replaces_a_checkpoint_in_one_step_and_cleans_what_killed_runs_left(tmp_path):
    out = tmp_path / "out"
    first = calibrate_on_ranks(1, *TINY, "--calib-samples", "2", "--out", str(out))
    assert first.returncode == 0, first.stderr[-3000:]
    stale = tmp_path / ".out.partial-12345"  # left by a killed run, with the lock file that names it
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"half")
    (tmp_path / ".out.lock").write_text("12345\n")
    second = calibrate_on_ranks(1, *TINY, "--recipe", "nvfp4_default-fp8_cast_kv",
                        "--calib-samples", "2", "--out", str(out), "--overwrite")
    assert second.returncode == 0, second.stderr[-3000:]
    assert verify(out)["quant_algo"] == "NVFP4" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    for file in out.glob("*.safetensors"):
        assert stat.S_IMODE(file.stat().st_mode) == 0o644


# The job in a process of its own, on a C library without renameat2 (so its commit takes the two-rename path of
# file systems without RENAME_EXCHANGE, such as NFS), killed with SIGKILL as it renames the finished checkpoint
# into place: after the previous checkpoint has been moved aside.
_JOB_KILLED_BETWEEN_RENAMES = """
import os, signal, sys
out = sys.argv[1]

def hook(event, args):
    if event == "ctypes.dlsym" and args[1] == "renameat2":
        raise AttributeError("renameat2")
    if event == "os.rename" and os.fspath(args[1]) == out:
        os.kill(os.getpid(), signal.SIGKILL)

sys.addaudithook(hook)
from dist_quant.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_commit_killed_between_its_two_renames_loses_nothing(tmp_path):
    """The next run puts the killed run's finished checkpoint in place (and, without --overwrite, then refuses
    to replace it) instead of deleting both copies."""
    out = tmp_path / "out"
    first = calibrate_on_ranks(1, *TINY, "--calib-samples", "2", "--out", str(out))
    assert first.returncode == 0, first.stderr[-3000:]
    killed = run_python("-c", _JOB_KILLED_BETWEEN_RENAMES, str(out), "calibrate", *TINY, "--recipe",
                        "nvfp4_default-fp8_cast_kv", "--calib-samples", "2", "--out", str(out), "--overwrite")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not out.exists() and len(list(tmp_path.glob(".out.old-*"))) == len(list(tmp_path.glob(".out.partial-*"))) == 1
    again = calibrate_on_ranks(1, *TINY, "--calib-samples", "2", "--out", str(out))
    _one_line_error(again, "exists: pass --overwrite to replace it")
    assert "was killed while replacing it; put back the checkpoint it had finished" in again.stderr
    assert verify(out)["quant_algo"] == "NVFP4" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_second_run_into_the_same_out_is_refused_while_the_first_holds_it(tmp_path):
    held = OutputTarget(tmp_path / "out")
    held.claim()
    try:
        result = calibrate_on_ranks(1, *TINY, "--calib-samples", "2", "--out", str(tmp_path / "out"))
        _one_line_error(result, "another run is writing it")
    finally:
        held.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_no_room_is_found_before_any_work():
    with pytest.raises(OutputError, match=r"GB free, the checkpoint needs about"):
        OutputTarget("/tmp/dist_quant-no-room").claim(estimated_bytes=1 << 60)
    assert not os.path.exists("/tmp/dist_quant-no-room")


@pytest.mark.parametrize(
    "content, text",
    [
        (b"\x00\xff\xfe\x01 binary", "not UTF-8 text"),
        (b'{"text": "fine"}\n{"text": broken\n', "line 2 is not JSON"),
        (b'{"text": 123}\n', "line 1 needs a string 'text' field"),
    ],
    ids=["binary", "bad-json-line", "text-not-a-string"],
)
def test_bad_calibration_data_is_one_line(tmp_path, content, text):
    data = tmp_path / "calib.jsonl"
    data.write_bytes(content)
    result = run_cli("calibrate", *TINY, "--calib-data", str(data), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and text in result.stderr, result.stderr


def test_a_cache_others_can_write_is_not_trusted(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o777)
    result = calibrate_on_ranks(1, *TINY, "--out", str(tmp_path / "o"), env={"DIST_QUANT_CACHE": str(cache)})
    _one_line_error(result, "the cache of built-in models must be a directory of your own that no one else can write")
    assert list(cache.iterdir()) == []


def test_the_builtin_weights_are_named_by_their_config(tmp_path, monkeypatch):
    from dist_quant import job

    monkeypatch.setenv("DIST_QUANT_CACHE", str(tmp_path))
    one, other = job.builtin_checkpoint_dir("tiny-qwen3-moe", 0), job.builtin_checkpoint_dir("tiny-qwen3-moe", 1)
    assert one.parent == tmp_path and one != other and one.name.startswith("tiny-qwen3-moe-seed0-")
    monkeypatch.setattr(job, "builtin_config", lambda name: {"changed": True})
    assert job.builtin_checkpoint_dir("tiny-qwen3-moe", 0) != one


def test_help_names_the_collective_timeout():
    result = run_cli("calibrate", "--help")
    assert "--timeout MINUTES" in result.stdout and "default 10" in result.stdout


@pytest.mark.parametrize("content", [b"\x00\x01 not json", b"[1, 2]"], ids=["garbage", "not-an-object"])
def test_a_garbage_config_json_is_one_line(tmp_path, content):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_bytes(content)
    result = run_cli("calibrate", "--hf-model", str(tmp_path / "model"), "--recipe", "fp8_default-fp8_cast_kv",
                     "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "config.json: " in result.stderr, result.stderr
