#!/usr/bin/env python3
"""One full amax sync of 10,000 quantizers on 4 ranks: dist_quant's flat-buffer reduction against one all-reduce
per quantizer (what ModelOpt 0.47's `TensorQuantizer.sync_amax_across_distributed_group` does) and against
stacking the amax into one tensor, one all-reduce, and copying back.

gloo on CPU by default; `--backend nccl` on a machine with 4 GPUs (one rank per GPU). Each rank holds 10,000
real TensorQuantizers with distinct amax; every method is checked to end with the max over ranks. Prints a
table and appends it to benchmarks/RESULTS.md (or --results).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

from _common import DEFAULT_RESULTS, append_results, command_line, md_table, utc_now

import torch  # noqa: E402  (after _common put the repository on sys.path)
import torch.distributed as dist  # noqa: E402

from dist_quant.parallel.groups import ParallelGroups  # noqa: E402
from dist_quant.parallel.reduce import AmaxReducer  # noqa: E402
from dist_quant.parallel.spawn import run_ranks  # noqa: E402
from dist_quant.formats import FP8, QuantFormat  # noqa: E402
from dist_quant.quantizer import TensorQuantizer  # noqa: E402

def _timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of fn over repeats, every rank starting together."""
    times = []
    for _ in range(repeats):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _per_rank(count: int, repeats: int, peer_repeats: int) -> dict:
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(rank)
    values = torch.rand(count, generator=gen)
    expected = values.to(device)
    dist.all_reduce(expected, op=dist.ReduceOp.MAX)  # the answer every method must reach
    expected = expected.cpu()
    quantizers = [TensorQuantizer(QuantFormat(FP8)) for _ in range(count)]
    groups = ParallelGroups(dp=dist.group.WORLD)

    def reset():
        for q, v in zip(quantizers, values.to(device)):
            q._set_amax(v.clone())

    reducer = AmaxReducer(groups, device)
    for i, q in enumerate(quantizers):
        reducer.register("dp+tp", f"layers.{i // 8}.q{i % 8}", torch.Size([]), q.bind_amax)
    reducer.allocate()

    def check(name):
        got = torch.stack([q._amax for q in quantizers]).cpu()
        assert torch.equal(got, expected), f"{name}: wrong result on rank {rank}"

    def per_quantizer():
        for q in quantizers:
            dist.all_reduce(q._amax, op=dist.ReduceOp.MAX)

    def stacked():
        flat = torch.stack([q._amax for q in quantizers])
        dist.all_reduce(flat, op=dist.ReduceOp.MAX)
        for q, v in zip(quantizers, flat):
            q._amax.copy_(v)

    results = {}
    for name, fn, reps in (
        ("one all-reduce per quantizer (ModelOpt 0.47)", per_quantizer, peer_repeats),
        ("stack, one all-reduce, copy back", stacked, repeats),
        ("dist_quant flat buffer: AmaxReducer.sync()", reducer.sync, repeats),
        ("dist_quant flat buffer, no NaN/Inf check", lambda: reducer.sync(check_finite=False), repeats),
    ):
        reset()
        before = reducer.collectives
        seconds = _timed(fn, device, reps)
        check(name)
        collectives = (reducer.collectives - before) // reps if "dist_quant" in name else (count if "per" in name else 1)
        results[name] = (seconds, collectives)
    return {"results": results, "world": world, "device": str(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--quantizers", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats of the fast methods (median)")
    parser.add_argument("--peer-repeats", type=int, default=1, help="timed repeats of the per-quantizer loop")
    parser.add_argument("--results", default=str(DEFAULT_RESULTS), help="markdown file the results are appended to")
    args = parser.parse_args()
    if args.backend == "nccl" and torch.cuda.device_count() < args.ranks:
        sys.exit(f"bench_sync: --backend nccl needs {args.ranks} GPUs, found {torch.cuda.device_count()}")
    report = run_ranks(
        args.ranks, _per_rank, args.quantizers, args.repeats, args.peer_repeats, backend=args.backend, timeout=900
    )[0]
    results = report["results"]
    peer = results["one all-reduce per quantizer (ModelOpt 0.47)"][0]
    ours = results["dist_quant flat buffer: AmaxReducer.sync()"][0]
    machine = torch.cuda.get_device_name() if args.backend == "nccl" else f"{platform.processor() or 'CPU'}, {os.cpu_count()} cores"
    rows = [
        [name, f"{seconds * 1e3:,.3f}", collectives, f"{peer / seconds:,.0f}x"]
        for name, (seconds, collectives) in results.items()
    ]
    target = 1000
    section = "\n".join([
        f"## bench_sync: one amax sync, {args.quantizers:,} quantizers, {args.ranks} ranks, {args.backend} ({utc_now()})",
        "",
        f"- machine: {machine}; torch {torch.__version__}, python {platform.python_version()}",
        f"- command: `{command_line()}`",
        f"- headline: flat buffer {peer / ours:,.0f}x faster than one all-reduce per quantizer "
        f"(target >= {target:,}x): {'PASS' if peer / ours >= target else 'MISS'}; every method checked to give the "
        "max over ranks",
        "",
        md_table(["method", "ms (median)", "all-reduces", "speedup vs per-quantizer"], rows),
    ])
    print(section)
    append_results(args.results, section)


if __name__ == "__main__":
    main()
