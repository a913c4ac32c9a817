#!/usr/bin/env python3
"""MXFP8, MXFP4 and FP8 token-group numerics on one CUDA GPU: our Triton kernels (kernels/mx_triton.py) against a
device-to-device copy (the ceiling), our torch reference, and ModelOpt 0.47's quantizers (the peers), in one run.

What one call does (a minute or two on an H200, ModelOpt's import included):
  1. A bf16 MxN torch.randn tensor (seeded; default 8192x8192).
  2. Correctness first: every kernel's output equals the torch reference bit for bit (values and scales); the
     ModelOpt peers' outputs are compared for information (its MXFP4 CUDA fake quant rounds ties to even, its
     export to the smaller magnitude, as ours does; docs/formats.md).
  3. Median times (triton.testing.do_bench, L2 cleared before each call) of: dst.copy_(x); each kernel; its torch
     reference; the peers: MXFP8QTensor.quantize and MXFP4QTensor.quantize (what ModelOpt's export runs, torch
     ops), and ModelOpt's MX fake quant (tensor_quant.dynamic_block_quant, its CUDA extension, built on first use:
     "peer missing" where it cannot be built). GB/s = (bytes read + bytes written) / time, and as a fraction of
     the copy's GB/s (the ceiling of a pass that reads and writes each element once).
  4. Prints a markdown section and appends it to --results.

Exit status: 0 done; 1 no CUDA GPU; 3 a kernel differs from the torch reference.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402  (puts the repository root on sys.path as well)
    DEFAULT_RESULTS,
    append_results,
    command_line,
    cuda_time_ms,
    md_table,
    short_error,
    utc_now,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_mx.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="8192x8192",
                   help="M x N of the bf16 input, N a multiple of 128 (default: %(default)s)")
    p.add_argument("--results", default=str(DEFAULT_RESULTS),
                   help="markdown file to append to (default: %(default)s)")
    p.add_argument("--no-modelopt", action="store_true", help="do not import or time ModelOpt")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    m, n = (int(v) for v in args.shape.lower().split("x"))
    if m <= 0 or n <= 0 or n % 128:
        p.error(f"--shape {args.shape}: both sides positive, the columns a multiple of 128")
    args.shape = (m, n)
    return args


def bits_equal(torch, a, b) -> bool:
    if a.dtype in (torch.bfloat16, torch.float16, torch.float32):
        nan = b.isnan()
        ints = {2: torch.int16, 4: torch.int32}[a.element_size()]
        return bool(torch.equal(a.isnan(), nan) and torch.equal(a[~nan].view(ints), b[~nan].view(ints)))
    return bool(torch.equal(a.view(torch.uint8), b.view(torch.uint8)))


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_mx: needs one CUDA GPU", file=sys.stderr)
        return 1
    from dist_quant.kernels import mx_triton as K
    from dist_quant.numerics import fp8_blocks, mx

    g = torch.Generator(device="cuda").manual_seed(args.seed)
    x = torch.randn(args.shape, device="cuda", dtype=torch.bfloat16, generator=g)
    numel = x.numel()
    cases = {  # name: (ours, torch reference, bytes written per element)
        "MXFP8 fake quant": (K.triton_mxfp8_fake_quant, mx.mxfp8_fake_quant, 2),
        "MXFP8 quantize": (K.triton_mxfp8_quantize, mx.mxfp8_quantize, 1 + 1 / 32),
        "MXFP4 fake quant": (K.triton_mxfp4_fake_quant, mx.mxfp4_fake_quant, 2),
        "MXFP4 quantize": (K.triton_mxfp4_quantize, mx.mxfp4_quantize, 0.5 + 1 / 32),
        "FP8 groups fake quant (float32)": (lambda t: K.triton_fp8_group_fake_quant(t, 128, "float32"),
                                            lambda t: fp8_blocks.fp8_group_fake_quant(t, 128, "float32"), 2),
        "FP8 groups fake quant (ue8m0)": (lambda t: K.triton_fp8_group_fake_quant(t, 128, "ue8m0"),
                                          lambda t: fp8_blocks.fp8_group_fake_quant(t, 128, "ue8m0"), 2),
        "FP8 groups quantize": (lambda t: K.triton_fp8_group_quantize(t, 128, "float32"),
                                lambda t: fp8_blocks.fp8_group_quantize(t, 128, "float32"), 1 + 4 / 128),
    }
    peers, peer_notes = {}, []
    if not args.no_modelopt:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import modelopt
                from modelopt.torch.quantization.qtensor import MXFP4QTensor, MXFP8QTensor
                from modelopt.torch.quantization.tensor_quant import dynamic_block_quant
            peer_notes.append(f"ModelOpt {modelopt.__version__}")
            peers["MXFP8 quantize"] = lambda t: MXFP8QTensor.quantize(t)
            peers["MXFP4 quantize"] = lambda t: MXFP4QTensor.quantize(t, 32)
            for name, bits in (("MXFP8 fake quant", (4, 3)), ("MXFP4 fake quant", (2, 1))):
                peer = lambda t, bits=bits: dynamic_block_quant(t, 32, None, None, bits, (8, 0))  # noqa: E731
                try:
                    peer(x[:128])
                    peers[name] = peer
                except Exception as exc:  # noqa: BLE001 (the CUDA extension may not build here)
                    peer_notes.append(f"{name} peer missing: {short_error(exc)}")
        except Exception as exc:  # noqa: BLE001
            peer_notes.append(f"ModelOpt missing: {short_error(exc)}")

    failed, rows = [], []
    dst = torch.empty_like(x)
    copy_ms = cuda_time_ms(lambda: dst.copy_(x))
    copy_gbs = 4 * numel / copy_ms / 1e6
    rows.append(["copy (ceiling)", f"{copy_ms:.4f}", f"{copy_gbs:.0f}", "100%", "", ""])
    for name, (ours, reference, written) in cases.items():
        out, expected = ours(x), reference(x)
        pairs = zip(out, expected) if isinstance(out, tuple) else [(out, expected)]
        equal = all(bits_equal(torch, a, b) for a, b in pairs)
        if not equal:
            failed.append(name)
        nbytes = numel * (2 + written)
        ours_ms, reference_ms = cuda_time_ms(lambda: ours(x)), cuda_time_ms(lambda: reference(x))
        peer_cell = "-"
        if name in peers:
            peer_ms = cuda_time_ms(lambda: peers[name](x))
            peer_out = peers[name](x)
            if isinstance(peer_out, tuple):
                peer_out = peer_out[0]._quantized_data
            ours_main = out[0] if isinstance(out, tuple) else out
            same = bits_equal(torch, peer_out, ours_main)
            peer_cell = f"{peer_ms:.4f} ms ({peer_ms / ours_ms:.1f}x ours; {'same bytes' if same else 'bytes differ'})"
        gbs = nbytes / ours_ms / 1e6
        rows.append([name + ("" if equal else " (DIFFERS from the reference)"), f"{ours_ms:.4f}",
                     f"{gbs:.0f}", f"{gbs / copy_gbs:.0%}", f"{reference_ms:.4f}", peer_cell])
    section = "\n".join([
        f"## bench_mx: {utc_now()}, {torch.cuda.get_device_name()}",
        "",
        f"`{command_line()}`; bf16 {args.shape[0]}x{args.shape[1]}; torch {torch.__version__}; "
        + "; ".join(peer_notes),
        "",
        md_table(["op", "ours (ms)", "ours GB/s", "of the copy's GB/s", "torch reference (ms)", "ModelOpt"], rows),
        "",
        "Bit-exact against the torch reference: " + ("all" if not failed else "FAIL: " + ", ".join(failed)),
    ])
    print(section)
    append_results(args.results, section)
    return 3 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
