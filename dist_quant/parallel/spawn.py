"""Run a function on a local process group (gloo on CPU, NCCL on one GPU per rank) and collect what each rank
returns: for tests, benchmarks, and trying dist_quant without torchrun."""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port nobody listens on now, for a local rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, out_dir: str, backend: str, fn, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    # Rendezvous through a file, not a free port: a port found free can be taken by another process (a gloo
    # connection of a concurrent job) before rank 0 listens on it, and then both jobs hang.
    dist.init_process_group(
        backend, init_method=f"file://{os.path.join(out_dir, 'rendezvous')}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=90),
    )
    try:
        torch.save(fn(*args), os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()
    # Done and saved: skip the interpreter's teardown, where the C++ destructors of gloo state that megatron's
    # globals still hold once aborted a finished pipeline-parallel rank ("terminate called without an active
    # exception", 1 run in several hundred).
    os._exit(0)


def run_ranks(world: int, fn, *args, timeout: float = 240.0, backend: str = "gloo") -> list:
    """Run fn(*args) on `world` ranks; -> each rank's return value (fn must be importable by name). A hang is a
    failure, not a wait."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
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
        errors = [open(os.path.join(out_dir, f)).read() for f in sorted(os.listdir(out_dir)) if f.endswith(".err")]
        if hung:
            raise TimeoutError(f"ranks {hung} of {world} still running after {timeout} s\n" + "\n".join(errors))
        if errors or any(p.exitcode for p in procs):
            raise RuntimeError(f"{len(errors)} of {world} ranks failed:\n" + "\n".join(errors))
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
