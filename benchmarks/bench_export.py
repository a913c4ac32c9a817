#!/usr/bin/env python3
"""Export speed: the main job on a built-in model, exported by rank 0 alone (`--export-writers one`, the peer) and
by every rank (`all`), on 1 and on N ranks (one GPU each, or CPU ranks), in one run. GB/s = bytes of the
checkpoint / seconds of the job's export stage (its own timer). The exports of each rank count must hold the same
tensors (compare_exports.py). Appends a table to RESULTS.md.

    python3 benchmarks/bench_export.py --model moe-1b --ranks 1 2
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import DEFAULT_RESULTS, REPO_ROOT, append_results, command_line, md_table, utc_now


def _job(ranks: int, writers: str, model: str, out: Path) -> tuple[float, str]:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "-m", "dist_quant.cli",
        "calibrate", "--model", model, "--recipe", "nvfp4_default-fp8_cast_kv", "--ep", str(ranks),
        "--calib-samples", "8", "--seq-len", "128", "--export-writers", writers, "--out", str(out), "--overwrite",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    seconds = float(re.search(r"export ([\d.]+) s", result.stdout).group(1))
    return seconds, " ".join(command)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="moe-1b")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--results", default=str(DEFAULT_RESULTS))
    args = parser.parse_args()
    import torch

    rows, commands = [], []
    with tempfile.TemporaryDirectory() as root:
        for ranks in args.ranks:
            outs = {}
            for writers in ("one", "all"):
                out = Path(root) / f"{ranks}-{writers}"
                seconds, command = _job(ranks, writers, args.model, out)
                size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
                rows.append([ranks, writers, f"{size / 1e9:.3f}", f"{seconds:.2f}", f"{size / 1e9 / seconds:.2f}"])
                commands.append(command)
                outs[writers] = out
            same = subprocess.run(
                [sys.executable, str(REPO_ROOT / "benchmarks" / "compare_exports.py"), str(outs["one"]), str(outs["all"])],
                capture_output=True, text=True,
            )
            rows[-1].append("same tensors" if same.returncode == 0 else "DIFFERENT: " + same.stdout[-300:])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    table = md_table(["ranks", "writers", "GB written", "export s", "GB/s", "one vs all"], [r + [""] * (6 - len(r)) for r in rows])
    print(table)
    append_results(args.results, "\n".join([
        f"## bench_export: {args.model}, rank 0 writing vs every rank writing ({utc_now()})",
        "",
        f"- device: {device}; torch {torch.__version__}",
        f"- command: `{command_line()}` (each job: `{commands[-1]}`)",
        "",
        table,
    ]))


if __name__ == "__main__":
    main()
