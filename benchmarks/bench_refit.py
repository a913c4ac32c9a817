#!/usr/bin/env python3
"""Real-quantized output at hardware speed, one rank, each figure beside its ceiling measured in the same call.

For each built-in config (default: moe-1b and qwen3-30b-a3b-shape; random weights drawn on the GPU, bfloat16,
`--recipe` calibrated on `--tokens`):
- ceiling: cloning every parameter on the GPU (each clone freed before the next, as a consumer would);
- `refit_stream(quantized=True)` (packed NVFP4 + scales) and `refit_stream` (bf16 weights + quantizer state):
  GB/s of what they yield, the first call (which plans the stream) and the best of the later ones;
- `refit_buckets` of both, 1 GiB buckets;
- bytes: the quantized stream against the torch reference quantization of the plain stream's weights and amax,
  for every quantized module of the first and the last layer;
- `recalibrate_weights` after the weights changed, against reading every weight once at the device's read
  bandwidth (a reduction over one large tensor, same call);
- export (`export_hf`, verified, into `--out-dir`) against the disk ceiling: the checkpoint's tensors, as GPU
  tensors of the same sizes, copied to the host and written as safetensors shards of the same size, nothing else;
- peak GPU memory of each step over the bf16 weights.
Appends a table to RESULTS.md. Targets (BENCHMARKS.md): packed >= 12 GB/s, bf16 >= 30 GB/s, export >= 85% of its
ceiling, recalibrate_weights <= 0.1 s on the 30B shape.

    python3 benchmarks/bench_refit.py --model moe-1b --model qwen3-30b-a3b-shape
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

from _common import DEFAULT_RESULTS, append_results, command_line, md_table, utc_now

import torch  # noqa: E402

GB = 1e9
SHARD_BYTES = 4 << 30  # export_hf's default


def _synced(fn):
    """(seconds, result) of fn, with the device idle before and after."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def _drain(stream) -> tuple[int, int]:
    """Consume a stream of (name, tensor) as a consumer that keeps nothing: -> (tensors, bytes)."""
    count = size = 0
    for _, tensor in stream:
        count += 1
        size += tensor.numel() * tensor.element_size()
    return count, size


def _drain_buckets(buckets) -> tuple[int, int]:
    count = size = 0
    for bucket in buckets:
        count += len(bucket.table)
        size += bucket.buffer.numel()
    return count, size


def _peak(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    seconds, out = _synced(fn)
    return seconds, out, torch.cuda.max_memory_allocated()


def _checked_modules(model, bridge, groups, layers: set[str]) -> tuple[int, int]:
    """Every quantized module of the given layers: the quantized stream's bytes against the torch reference
    (`dist_quant.numerics`) applied to the plain stream's weight and amax. -> (modules, modules differing)."""
    from dist_quant.numerics import nvfp4_quantize
    from dist_quant.refit import refit_stream

    wanted = tuple(f"model.layers.{n}." for n in layers)
    plain = {n: t.clone() for n, t in refit_stream(model, bridge, groups) if n.startswith(wanted)}
    quantized = {n: t.clone() for n, t in refit_stream(model, bridge, groups, quantized=True) if n.startswith(wanted)}
    modules = [n[: -len(".weight_scale_2")] for n in quantized if n.endswith(".weight_scale_2")]
    differing = 0
    for module in modules:
        state = f"{module}.weight_quantizer"
        amax = plain.get(f"{state}._global_amax", plain[f"{state}._amax"])
        packed, scale, scale_2 = nvfp4_quantize(plain[f"{module}.weight"], amax, plain.get(f"{state}._block_amax"))
        same = (
            torch.equal(packed, quantized[f"{module}.weight"])
            and torch.equal(scale.view(torch.uint8), quantized[f"{module}.weight_scale"].view(torch.uint8))
            and torch.equal(scale_2, quantized[f"{module}.weight_scale_2"])
        )
        differing += not same
    return len(modules), differing


def _read_bandwidth(device) -> float:
    """Bytes per second of one reduction over a large bf16 tensor: what reading the weights once can reach."""
    x = torch.ones(1 << 31, dtype=torch.bfloat16, device=device)
    x.amax()
    seconds = min(_synced(lambda: x.amax())[0] for _ in range(5))
    return x.numel() * x.element_size() / seconds


def _disk_ceiling(layout: list[tuple[str, tuple, torch.dtype]], scratch: Path, device, shard_bytes: int) -> float:
    """Seconds to write tensors of the checkpoint's names, shapes and dtypes from the GPU to the host and into
    safetensors shards of the export's size (safetensors' own save_file), nothing else."""
    from safetensors.torch import save_file

    shards, current, size = [], [], 0
    for name, shape, dtype in layout:
        nbytes = math.prod(shape) * dtype.itemsize
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape, dtype))
        size += nbytes
    shards.append(current)
    scratch.mkdir()
    total = 0.0
    for i, entries in enumerate(shards):
        gpu = {n: torch.empty(shape, dtype=dtype, device=device) for n, shape, dtype in entries}
        path = scratch / f"{i}.safetensors"
        seconds, _ = _synced(lambda gpu=gpu, path=path: save_file({n: t.cpu() for n, t in gpu.items()}, path, metadata={"format": "pt"}))
        total += seconds
    shutil.rmtree(scratch)
    return total


def _warm_host_memory(nbytes: int) -> None:
    """Touch as much host memory as a checkpoint takes: the GPU machines' VMs grow their memory on first touch
    (about 3 s per 8 GiB), which would otherwise fall on whichever of export and ceiling runs first."""
    import numpy as np

    np.ones(nbytes, dtype=np.uint8)


def _profiled(fn, top: int):
    """fn() under cProfile, printing its `top` functions by cumulative time (export is bound by the host)."""
    import cProfile
    import io
    import pstats

    profile = cProfile.Profile()
    result = profile.runcall(fn)
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(top)
    print(text.getvalue(), flush=True)
    return result


def measure(
    name: str, recipe: str, batch: int, seq: int, device, out_root: Path, repeats: int, profile: int = 0,
    export: bool = True,
) -> dict:
    from dist_quant import load_recipe
    from dist_quant.bridge import ModelBridge
    from dist_quant.calibrate import attach_quantizers, calibrate, recalibrate_weights
    from dist_quant.export import export_hf
    from dist_quant.job import CONFIGS
    from dist_quant.parallel import megatron_compat
    from dist_quant.parallel.groups import ParallelGroups
    from dist_quant.refit import refit_buckets, refit_stream

    bridge = ModelBridge.from_hf(CONFIGS / f"{name}.json")
    megatron_compat.seed(0)
    model = bridge.build(dtype=torch.bfloat16, device=device).eval()
    groups = ParallelGroups()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    vocab = bridge.hf_config["vocab_size"]
    tokens = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    positions = torch.arange(seq, device=device)[None].expand(batch, seq)
    mask = megatron_compat.causal_attention_mask(seq, device)
    recipe = load_recipe(recipe)
    attach_quantizers(model, recipe, groups)
    with torch.no_grad():
        calibrate(model, recipe, lambda m: m(tokens, positions, mask), groups)
    rows = []

    def row(what, seconds, size, ceiling_s, ceiling_what, peak=None, note=""):
        rate = size / seconds / GB if size else None
        rows.append([
            name, what, f"{seconds:.3f}", f"{size / GB:.2f}" if size else "", f"{rate:.1f}" if rate else "",
            f"{ceiling_s / seconds:.2f}" if ceiling_s else "", ceiling_what,
            f"{peak / weights:.2f}x" if peak else "", note,
        ])

    params = list(model.parameters())

    def clone_all():  # each clone dropped at once, as by a consumer of the stream that keeps nothing
        for p in params:
            p.clone()

    clone_s = min(_synced(clone_all)[0] for _ in range(repeats))
    row("ceiling: clone every parameter", clone_s, weights, None, "")
    for quantized, label in ((True, "refit_stream(quantized=True)"), (False, "refit_stream (bf16 + quantizer state)")):
        first, (count, size), peak = _peak(lambda: _drain(refit_stream(model, bridge, groups, quantized=quantized)))
        later = min(_synced(lambda: _drain(refit_stream(model, bridge, groups, quantized=quantized)))[0] for _ in range(repeats))
        row(f"{label}, first call (plans)", first, size, clone_s, "clone", peak, f"{count:,} tensors")
        row(label, later, size, clone_s, "clone", None, f"{count:,} tensors")
        buckets = lambda: _drain_buckets(refit_buckets(model, bridge, groups, 1 << 30, quantized=quantized))  # noqa: E731
        label = f"refit_buckets(1 GiB{', quantized' if quantized else ''})"
        first, (count, size), peak = _peak(buckets)  # the first also grows the allocator's cache by the buckets
        later = min(_synced(buckets)[0] for _ in range(repeats))
        row(f"{label}, first call", first, size, clone_s, "clone", peak, f"{count:,} tensors")
        row(label, later, size, clone_s, "clone", None, f"{count:,} tensors")
        if profile and quantized:
            _profiled(buckets, profile)
    layers = bridge.hf_config["num_hidden_layers"]
    modules, differing = _checked_modules(model, bridge, groups, {0, layers - 1})
    bytes_note = f"{modules} modules of layers 0 and {layers - 1} vs torch reference: {'identical' if not differing else f'{differing} DIFFER'}"
    with torch.no_grad():
        for p in params:
            p.mul_(1.01)
    read_s = weights / _read_bandwidth(device)
    recalibrate_weights(model)
    seconds = min(_synced(lambda: recalibrate_weights(model))[0] for _ in range(repeats))
    row("recalibrate_weights", seconds, weights, read_s, "read weights once")
    if not export:
        return {"rows": rows, "bytes": bytes_note, "weights": weights}
    out = out_root / f"{name}-nvfp4"
    layout = [(n, tuple(t.shape), t.dtype) for n, t in refit_stream(model, bridge, groups, quantized=True)]
    _warm_host_memory(2 * sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in layout))
    disk_s = _disk_ceiling(layout, out_root / f"{name}-ceiling", device, SHARD_BYTES)
    seconds, _, peak = _peak(lambda: export_hf(model, bridge, out, groups, max_shard_bytes=SHARD_BYTES))
    written = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    row("export_hf (verified)", seconds, written, disk_s, "GPU -> host -> shards", peak)
    if profile:
        _profiled(lambda: export_hf(model, bridge, out, groups, overwrite=True, max_shard_bytes=SHARD_BYTES), profile)
    shutil.rmtree(out)
    return {"rows": rows, "bytes": bytes_note, "weights": weights}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="built-in configs (default: moe-1b, qwen3-30b-a3b-shape)")
    parser.add_argument("--recipe", default="nvfp4_default-fp8_cast_kv")
    parser.add_argument("--tokens", default="2x512", help="BATCHxSEQ of the calibration forward")
    parser.add_argument("--repeats", type=int, default=3, help="later calls timed; the best counts")
    parser.add_argument("--out-dir", default=None, help="where the export is written (default: a temporary directory)")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="also profile one more export, printing its N slowest functions")
    parser.add_argument("--no-export", action="store_true", help="refits and recalibration only")
    parser.add_argument("--results", default=str(DEFAULT_RESULTS))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_refit measures GPU refits and needs a CUDA GPU")
    warnings.filterwarnings("ignore", module=r"megatron(\.|$)")
    from dist_quant.job import init_distributed
    from dist_quant.parallel import megatron_compat

    device = init_distributed()
    megatron_compat.initialize(1, 1)
    batch, seq = map(int, args.tokens.split("x"))
    headers = ["model", "what", "s", "GB", "GB/s", "vs ceiling", "ceiling", "peak / weights", "note"]
    rows, notes = [], []
    root = Path(args.out_dir or tempfile.mkdtemp(prefix="bench_refit-"))
    root.mkdir(parents=True, exist_ok=True)
    for name in args.model or ["moe-1b", "qwen3-30b-a3b-shape"]:
        result = measure(name, args.recipe, batch, seq, device, root, args.repeats, args.profile, not args.no_export)
        rows += result["rows"]
        notes.append(f"- {name}: {result['weights'] / GB:.1f} GB of bf16 weights; bytes: {result['bytes']}")
        print(md_table(headers, result["rows"]), flush=True)
        torch.cuda.empty_cache()
    section = "\n".join([
        f"## bench_refit: {args.recipe}, one rank ({utc_now()})",
        "",
        f"- device: {torch.cuda.get_device_name()}; torch {torch.__version__}",
        f"- command: `{command_line()}`",
        "- 'vs ceiling': the ceiling's seconds over ours (1.00 = at the ceiling)",
        *notes,
        "",
        md_table(headers, rows),
    ])
    print(section)
    append_results(args.results, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
