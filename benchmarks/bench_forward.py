#!/usr/bin/env python3
"""Forward time of a megatron-core MoE in calibrating and in quantizing mode against its plain forward, one rank.

For each built-in config (random weights, `--dtype`, default bfloat16 on GPU): the plain forward; then with the
recipe's quantizers attached and activation quantizers collecting amax (calibrating mode: what calibration
batches cost); then calibrated and fake-quantizing (quantizing mode), also with the fake-quantized weight cache
(`cache_fake_quant_weights`). Both modes also with the experts' quantizers working expert by expert instead of
in one pass per MoE layer (`BatchedExperts.batched` False), to show what the one pass saves. On GPU, the host
time of one fake-quant call against Triton's own launcher and a torch op.
Median of --reps forwards after warm-up (CUDA events on GPU). Targets (BENCHMARKS.md): calibrating <= 1.3x,
quantizing <= 1.5x the plain forward. Appends to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
import warnings

from _common import DEFAULT_RESULTS, append_results, command_line, md_table, utc_now

import torch  # noqa: E402

TARGETS = {"calibrating": 1.3, "quantizing": 1.5}


def _median_ms(fn, reps: int, device: torch.device) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _host_profile(fn, top: int) -> str:
    """Where one call of fn spends host time, by Python function (cProfile: Triton's launcher included, which
    torch's profiler does not see): the quantized forward of an MoE is bound by host time, not by the GPU."""
    fn()
    profile = cProfile.Profile()
    profile.runcall(fn)
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def launch_costs(device: torch.device, calls: int = 2000) -> dict[str, float]:
    """Host microseconds per call, small bf16 tensor (an expert's input): a quantizer's NVFP4 fake quant
    (dist_quant's direct launch of the compiled kernel), the same kernel through Triton's launcher, and one
    torch op for scale. The GPU work is a few microseconds, so the loop is bound by host time."""
    import triton

    from dist_quant.kernels import nvfp4_triton
    from dist_quant.formats import QuantFormat
    from dist_quant.quantizer import QuantizerMode, TensorQuantizer

    x = torch.randn(256, 1024, device=device, dtype=torch.bfloat16)
    quantizer = TensorQuantizer(QuantFormat("nvfp4", block_type="dynamic")).to(device)
    quantizer.calibrate_from(x)
    quantizer.mode = QuantizerMode.QUANTIZING
    n_blocks = x.numel() // 16
    y = torch.empty_like(x)

    def triton_launcher():
        nvfp4_triton._nvfp4_fake_quant_kernel[(triton.cdiv(n_blocks, nvfp4_triton.FAKE_QUANT_BLOCKS),)](
            x, y, quantizer._amax, quantizer._amax, quantizer._amax, n_blocks, 1, STATIC=False, SEGMENTED=False,
            BLOCKS=nvfp4_triton.FAKE_QUANT_BLOCKS, INTERPRETED=False, num_warps=nvfp4_triton.FAKE_QUANT_WARPS,
        )

    costs = {}
    for label, fn in [
        ("TensorQuantizer NVFP4 fake quant", lambda: quantizer(x)),
        ("the kernel through Triton's launcher", triton_launcher),
        ("one torch op (x * 2)", lambda: x * 2),
    ]:
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        costs[label] = (time.perf_counter() - start) / calls * 1e6
    return costs


def measure(
    name: str, recipe: str, batch: int, seq: int, dtype: torch.dtype, device: torch.device, reps: int, profile: int = 0
) -> dict:
    from dist_quant import load_recipe
    from dist_quant.bridge import ModelBridge
    from dist_quant.calibrate import attach_quantizers, cache_fake_quant_weights, calibrate, quantizers
    from dist_quant.job import CONFIGS
    from dist_quant.modules.megatron import BatchedExperts
    from dist_quant.parallel import megatron_compat
    from dist_quant.quantizer import QuantizerMode

    bridge = ModelBridge.from_hf(CONFIGS / f"{name}.json")
    megatron_compat.seed(0)
    model = bridge.build(dtype=dtype).to(device).eval()
    vocab = bridge.hf_config["vocab_size"]
    tokens = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    positions = torch.arange(seq, device=device)[None].expand(batch, seq)
    mask = megatron_compat.causal_attention_mask(seq, device)

    def forward():
        with torch.no_grad():
            model(tokens, positions, mask)

    times = {"plain": _median_ms(forward, reps, device)}
    recipe = load_recipe(recipe)
    attach_quantizers(model, recipe)
    layers = [m for m in model.modules() if isinstance(m, BatchedExperts)]

    weights = {id(q) for n, q in quantizers(model) if n.endswith("weight_quantizer")}
    for _, q in quantizers(model):
        if q.calibrator is not None and id(q) not in weights:
            q.mode = QuantizerMode.CALIBRATING
    times["calibrating"] = _median_ms(forward, reps, device)
    for layer in layers:  # the experts' fc1 input amax collected expert by expert instead of in one pass
        layer.batched = False
    times["calibrating, per-expert"] = _median_ms(forward, reps, device)
    for layer in layers:
        layer.batched = True
    for _, q in quantizers(model):
        q.mode = QuantizerMode.DISABLED
    calibrate(model, recipe, lambda m: m(tokens, positions, mask))
    times["quantizing"] = _median_ms(forward, reps, device)
    for layer in layers:
        layer.batched = False
    times["quantizing, per-expert"] = _median_ms(forward, reps, device)
    for layer in layers:
        layer.batched = True
    cache_fake_quant_weights(model)
    times["quantizing, weight cache"] = _median_ms(forward, reps, device)
    if profile:
        cache_fake_quant_weights(model, enabled=False)
        print(f"host time of one quantizing forward, {name}:\n{_host_profile(forward, profile)}", flush=True)
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "times": times}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="built-in configs (default: tiny-qwen3-moe and moe-1b on GPU)")
    parser.add_argument("--recipe", default="nvfp4_default-fp8_cast_kv")
    parser.add_argument("--tokens", default=None, help="BATCHxSEQ (default 4x512 on GPU, 2x64 on CPU)")
    parser.add_argument("--dtype", default=None, choices=("bfloat16", "float32"))
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="also print the N Python functions of a quantizing forward with the most host time")
    parser.add_argument("--results", default=str(DEFAULT_RESULTS))
    args = parser.parse_args()
    warnings.filterwarnings("ignore", module=r"megatron(\.|$)")
    from dist_quant.job import init_distributed
    from dist_quant.parallel import megatron_compat

    device = init_distributed()
    megatron_compat.initialize(1, 1)
    gpu = device.type == "cuda"
    models = args.model or (["tiny-qwen3-moe", "moe-1b"] if gpu else ["tiny-qwen3-moe"])
    batch, seq = map(int, (args.tokens or ("4x512" if gpu else "2x64")).split("x"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    rows, verdicts = [], []
    for name in models:
        result = measure(name, args.recipe, batch, seq, dtype, device, args.reps, args.profile)
        plain = result["times"]["plain"]
        for mode, ms in result["times"].items():
            ratio = ms / plain
            target = TARGETS.get(mode.split(",")[0]) if mode != "plain" else None
            rows.append([name, f"{result['params'] / 1e9:.3f}B", mode, f"{ms:.2f}", f"{ratio:.2f}x", f"<= {target}x" if target else ""])
            if target and "," not in mode:
                verdicts.append(f"- {name} {mode}: {ratio:.2f}x the plain forward (target <= {target}x): {'PASS' if ratio <= target else 'MISS'}")
    where = torch.cuda.get_device_name() if gpu else "CPU"
    section = "\n".join([
        f"## bench_forward: {args.recipe}, {batch}x{seq} tokens, {dtype}, one rank ({utc_now()})",
        "",
        f"- device: {where}; torch {torch.__version__}",
        f"- command: `{command_line()}`",
        *verdicts,
        "",
        md_table(["model", "params", "mode", "ms (median)", "vs plain", "target"], rows),
    ])
    if gpu:
        costs = launch_costs(device)
        section += "\n\n" + md_table(["host time per call, 256x1024 bf16", "us"], [[k, f"{v:.1f}"] for k, v in costs.items()])
    print(section)
    append_results(args.results, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
