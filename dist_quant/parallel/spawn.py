"""Run a function on a local process group (gloo on CPU, NCCL on one GPU per rank) and collect what each rank
returns: for tests, benchmarks, and trying dist_quant without torchrun.

Starting a rank costs seconds of imports (megatron-core alone takes 6-7 s on a 2-core machine), more than most
jobs of a test suite. With `keep=True` (or DIST_QUANT_KEEP_RANKS=1, which the test suite sets) gloo ranks stay
alive between calls: each call gets a fresh process group and fresh megatron parallel state in processes that
have imported everything already. A job that fails or hangs ends its processes, and the next call starts new ones.
"""

from __future__ import annotations

import atexit
import datetime
import os
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

KEEP_ENV = "DIST_QUANT_KEEP_RANKS"
# A collective waits this long for a slow peer before it fails: generous, because a rank of a loaded machine can
# lag another by minutes (a test job is a hang only when run_ranks' own timeout passes).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


def _run_job(rank: int, world: int, out_dir: str, backend: str, fn, args) -> bool:
    """One rank's part of a job: a process group, fn, its result (or traceback) saved. -> whether fn returned."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    # Rendezvous through a file, not a free port: a port found free can be taken by another process (a gloo
    # connection of a concurrent job) before rank 0 listens on it, and then both jobs hang.
    dist.init_process_group(
        backend, init_method=f"file://{os.path.join(out_dir, 'rendezvous')}", rank=rank, world_size=world,
        timeout=COLLECTIVE_TIMEOUT,
    )
    try:
        torch.save(fn(*args), os.path.join(out_dir, f"rank{rank}.pt"))
        return True
    except BaseException:  # noqa: BLE001 - reported to the caller through the file
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        return False
    finally:
        _forget_megatron()
        if dist.is_initialized():  # fn may have ended the group itself (the job does)
            dist.destroy_process_group()


def _forget_megatron() -> None:
    """The next job of a kept rank starts from megatron's initial parallel state, whatever this one set."""
    import sys

    if "megatron.core.parallel_state" in sys.modules:
        sys.modules["megatron.core.parallel_state"].destroy_model_parallel()


def _entry(rank: int, world: int, out_dir: str, backend: str, fn, args) -> None:
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    ok = _run_job(rank, world, out_dir, backend, fn, args)
    # Done and saved: skip the interpreter's teardown, where the C++ destructors of gloo state that megatron's
    # globals still hold once aborted a finished pipeline-parallel rank ("terminate called without an active
    # exception", 1 run in several hundred).
    os._exit(0 if ok else 1)


def _serve(rank: int, conn) -> None:
    """A kept rank: runs the jobs it is sent until told to stop (None) or its parent goes."""
    torch.set_num_threads(1)
    while True:
        try:
            job = conn.recv()
        except EOFError:
            break
        if job is None:
            break
        ok = _run_job(rank, *job)
        conn.send(ok)
        if not ok:  # gone, so that peers still waiting on it in a collective fail at once instead of timing out
            os._exit(1)
    os._exit(0)


class _Kept:
    """The kept ranks of this process: rank r is the r-th, started on first need."""

    def __init__(self):
        self.ranks: list[tuple[mp.Process, object]] = []
        atexit.register(self.stop)

    def get(self, world: int) -> list[tuple[mp.Process, object]]:
        ctx = mp.get_context("spawn")
        while len(self.ranks) < world:
            parent, child = ctx.Pipe()
            process = ctx.Process(target=_serve, args=(len(self.ranks), child), daemon=True)
            process.start()
            self.ranks.append((process, parent))
        return self.ranks[:world]

    def stop(self) -> None:
        """End every kept rank (after a failed or hung job, whose ranks may be anywhere)."""
        for process, conn in self.ranks:
            if process.is_alive():
                process.kill()
            process.join()
            conn.close()
        self.ranks = []


_KEPT = _Kept()


def _results(out_dir: str, world: int, hung: list[int], failed: bool, timeout: float) -> list:
    errors = [open(os.path.join(out_dir, f)).read() for f in sorted(os.listdir(out_dir)) if f.endswith(".err")]
    if hung:
        raise TimeoutError(f"ranks {hung} of {world} still running after {timeout} s\n" + "\n".join(errors))
    if errors or failed:
        raise RuntimeError(f"{len(errors)} of {world} ranks failed:\n" + "\n".join(errors))
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def run_ranks(
    world: int, fn, *args, timeout: float = 600.0, backend: str = "gloo", keep: bool | None = None
) -> list:
    """Run fn(*args) on `world` ranks; -> each rank's return value (fn must be importable by name). A job still
    running after `timeout` seconds is a hang: a failure, not a wait. `keep` (gloo only; default from
    DIST_QUANT_KEEP_RANKS): run in ranks kept alive between calls (see the module's docstring)."""
    keep = os.environ.get(KEEP_ENV) == "1" if keep is None else keep
    with tempfile.TemporaryDirectory() as out_dir:
        if keep and backend == "gloo":
            ranks = _KEPT.get(world)
            for _, conn in ranks:
                conn.send((world, out_dir, backend, fn, args))
            deadline = time.monotonic() + timeout
            done = [conn.poll(max(0.0, deadline - time.monotonic())) for _, conn in ranks]
            hung = [r for r, ok in enumerate(done) if not ok]
            failed = False
            try:
                failed = not all(conn.recv() for (_, conn), ok in zip(ranks, done) if ok)
            except EOFError:  # a rank died without a word
                failed = True
            if hung or failed:
                _KEPT.stop()
            return _results(out_dir, world, hung, failed, timeout)
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_entry, args=(r, world, out_dir, backend, fn, args)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        return _results(out_dir, world, hung, any(p.exitcode for p in procs), timeout)
