#!/usr/bin/env python3
"""NVFP4 MSE FP8-scale sweep of a bf16 8192x4096 weight on one CUDA GPU: our fused Triton kernel against our
torch reference and ModelOpt 0.47's `nvfp4_fp8_scale_sweep`, in one run.

Reports median times (triton.testing.do_bench), whether the kernel's per-block amax equal the reference's bit
for bit, how often ModelOpt picks the same block scale, a launch sweep (MSE_BLOCKS x MSE_WARPS), and the
compute floor: 126 candidates x 16 elements per block x OPS_PER_CANDIDATE_ELEMENT float32 operations at the
GPU's float32 rate (SMs x 128 lanes x clock). Appends a section to benchmarks/RESULTS.md (or --results).
"""

from __future__ import annotations

import argparse
import sys

from _common import DEFAULT_RESULTS, append_results, command_line, cuda_time_ms, md_table, short_error, utc_now

import torch  # noqa: E402  (after _common put the repository on sys.path)

# Per element and candidate: reciprocal multiply + 2 FMA (exact quotient), 2 compares + 2 selects + add + sub +
# min (E2M1 rounding), 2 multiplies (dequantize), subtract, square, and 15/16 of a tree add, plus the compare and
# selects of the argmin per block (3/16): about 16. The floor counts each as one float32 lane operation.
OPS_PER_CANDIDATE_ELEMENT = 16
CANDIDATES = 126
MODELOPT_TARGET = 1.5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="8192x4096")
    parser.add_argument("--results", default=str(DEFAULT_RESULTS))
    parser.add_argument("--no-sweep", action="store_true", help="skip the launch-parameter sweep")
    parser.add_argument("--clock-ghz", type=float, default=1.98, help="SM boost clock for the floor (H100/H200)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_mse: needs a CUDA GPU")
        return 1
    from dist_quant.kernels import nvfp4_mse_triton as K
    from dist_quant.numerics import nvfp4_fake_quant, nvfp4_mse_block_amax

    rows, cols = map(int, args.shape.split("x"))
    torch.manual_seed(0)
    w = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    g = w.float().abs().max()
    props = torch.cuda.get_device_properties(0)
    clock_ghz = args.clock_ghz
    floor_ms = w.numel() * CANDIDATES * OPS_PER_CANDIDATE_ELEMENT / (props.multi_processor_count * 128 * clock_ghz * 1e9) * 1e3

    ours = K.triton_nvfp4_mse_block_amax(w, g)
    reference = nvfp4_mse_block_amax(w, g)
    exact = torch.equal(ours, reference)
    t_ours = cuda_time_ms(lambda: K.triton_nvfp4_mse_block_amax(w, g))
    t_ref = cuda_time_ms(lambda: nvfp4_mse_block_amax(w, g), warmup_ms=1, rep_ms=1)
    mse_ours = (nvfp4_fake_quant(w, g, ours).float() - w.float()).square().mean().item()
    mse_max = (nvfp4_fake_quant(w, g).float() - w.float()).square().mean().item()

    peer, t_peer, note = None, None, ""
    try:
        from modelopt.torch.kernels.quantization.gemm.nvfp4_fp8_sweep import nvfp4_fp8_scale_sweep

        peer = nvfp4_fp8_scale_sweep(w, g).reshape(ours.shape)
        t_peer = cuda_time_ms(lambda: nvfp4_fp8_scale_sweep(w, g))
        same = (peer == ours).float().mean().item()
        mse_peer = (nvfp4_fake_quant(w, g, peer).float() - w.float()).square().mean().item()
        note = f"same block amax as ours in {100 * same:.3f}% of blocks; weight MSE {mse_peer:.6g} (ours {mse_ours:.6g})"
    except Exception as error:  # the peer is optional: say why it is missing
        note = f"peer missing: {short_error(error)}"

    sweep_rows = []
    if not args.no_sweep:
        defaults = K.MSE_BLOCKS, K.MSE_WARPS
        try:
            for blocks, warps in ((64, 2), (128, 4), (256, 8), (256, 4), (512, 8), (128, 2)):
                K.MSE_BLOCKS, K.MSE_WARPS = blocks, warps
                equal = torch.equal(K.triton_nvfp4_mse_block_amax(w, g), reference)
                t = cuda_time_ms(lambda: K.triton_nvfp4_mse_block_amax(w, g))
                sweep_rows.append([blocks, warps, f"{t:.3f}", f"{t / floor_ms:.2f}x", "yes" if equal else "NO"])
        finally:
            K.MSE_BLOCKS, K.MSE_WARPS = defaults

    table = md_table(
        ["what", "ms (median)", "vs ours", "note"],
        [
            ["ours: fused Triton sweep", f"{t_ours:.3f}", "1.00x", f"bit-identical to the reference: {exact}"],
            ["our torch reference", f"{t_ref:.3f}", f"{t_ref / t_ours:.1f}x slower", "chunks of 16384 blocks"],
            ["ModelOpt nvfp4_fp8_scale_sweep", f"{t_peer:.3f}" if t_peer else "-", f"{t_peer / t_ours:.2f}x slower" if t_peer else "-", note],
            ["compute floor", f"{floor_ms:.3f}", f"ours at {t_ours / floor_ms:.2f}x the floor", f"{OPS_PER_CANDIDATE_ELEMENT} ops x {CANDIDATES} candidates per element"],
        ],
    )
    headline = [
        f"- ours vs ModelOpt: {t_peer / t_ours:.2f}x (target: faster, aiming at {MODELOPT_TARGET}x): "
        f"{'PASS' if t_peer / t_ours >= MODELOPT_TARGET else 'faster' if t_peer > t_ours else 'MISS'}" if t_peer else f"- ModelOpt: {note}",
        f"- ours vs our reference: {t_ref / t_ours:.0f}x; ours at {t_ours / floor_ms:.2f}x the compute floor",
        f"- correctness: per-block amax bit-identical to the reference: {'PASS' if exact else 'FAIL'}",
        f"- weight MSE: max calibration {mse_max:.6g}, MSE sweep {mse_ours:.6g}",
    ]
    section = "\n".join(
        [
            f"## bench_mse: NVFP4 FP8-scale sweep, bf16 {args.shape} ({utc_now()})",
            "",
            f"- GPU: {torch.cuda.get_device_name()} ({props.multi_processor_count} SMs, {clock_ghz:.2f} GHz)",
            f"- versions: torch {torch.__version__}, triton {__import__('triton').__version__}",
            f"- command: `{command_line()}`",
            "",
            *headline,
            "",
            table,
            "",
            md_table(["MSE_BLOCKS", "MSE_WARPS", "ms", "vs floor", "bit-equal"], sweep_rows) if sweep_rows else "",
        ]
    )
    print(section)
    append_results(args.results, section)
    return 0 if exact else 3


if __name__ == "__main__":
    sys.exit(main())
