"""Small helpers shared by the scripts in benchmarks/ (see shared BENCHMARKS.md for what each one measures).

Importing this module puts the repository root on sys.path, so the scripts run from a plain checkout where
dist_quant is not pip-installed (as on the GPU machines).
"""

from __future__ import annotations

import datetime
import os
import shlex
import statistics
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

DEFAULT_RESULTS = REPO_ROOT / "benchmarks" / "RESULTS.md"


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def command_line() -> str:
    """The exact command as run: interpreter name plus sys.argv."""
    return shlex.join([os.path.basename(sys.executable or "python3")] + sys.argv)


def md_cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ").strip()


def md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(md_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def append_results(path: str | os.PathLike, section: str) -> Path:
    """Append a markdown section (it should start with a '## ' heading) to the results file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", encoding="utf-8") as f:
        if new:
            f.write("# Benchmark results\n\nAppended by the scripts in benchmarks/; newest last.\n")
        f.write("\n" + section.rstrip() + "\n")
    return path


def short_error(exc: BaseException, limit: int = 160) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ").strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def cuda_time_ms(fn, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median time of fn() in ms on the current CUDA device.

    Uses triton.testing.do_bench (which warms up and clears L2 before each timed call); falls back to a plain
    CUDA-event loop with the same warm-up / repetition budget if do_bench is missing or changed its signature.
    """
    import torch

    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    except (ImportError, TypeError, AssertionError):
        pass
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 3, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    n = max(3, int(rep_ms / estimate))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))
