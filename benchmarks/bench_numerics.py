#!/usr/bin/env python3
"""NVFP4 fake-quant throughput on one CUDA GPU: our Triton kernel against a device-to-device copy (the ceiling),
our torch reference, and ModelOpt 0.47's `fp4_fake_quant_block` (the peer), all in one run.

What one call does (estimated 1-2 minutes on an H100, ModelOpt's import included; --time-budget caps the
sweep):
  1. bf16 8192x8192 torch.randn (seeded), global_amax = abs max as a float32 scalar on the GPU; a few such
     tensors are made and the timed calls rotate among them.
  2. Median times (triton.testing.do_bench, warm-up first, L2 cleared before each timed call), taken in a few
     interleaved rounds, of: dst.copy_(src); triton_nvfp4_fake_quant; the dispatcher dist_quant.kernels
     .nvfp4_fake_quant; the torch reference dist_quant.numerics.nvfp4_fake_quant; ModelOpt's
     fp4_fake_quant_block(x, global_amax, block_size=16). GB/s = (bytes read + bytes written) / time, both
     the bf16 tensor's size.
  3. Correctness: our Triton output must equal the torch reference bit for bit (int16 view); the difference
     from ModelOpt's output is reported for information.
  4. Launch sweep of our kernel over FAKE_QUANT_BLOCKS x FAKE_QUANT_WARPS (module constants of
     dist_quant.kernels.nvfp4_triton, read at launch; restored afterwards) on 8192x8192, 4096x4096 and
     16384x8192, each variant also checked bit for bit against the reference.
  5. Prints a markdown section whose last part is the main table, and appends the same section to --results:
     date, GPU, versions, command, headline ratios with PASS/MISS (ours >= 85% of copy bandwidth, >= 1.3x
     ModelOpt), the sweep and the main table.

ModelOpt is optional: when it cannot be imported (carry it as wheels, see the device README), its rows read
"peer missing: <reason>" and the rest still runs. Exit status: 0 done; 1 no CUDA GPU; 2 our kernel could not be
timed; 3 our Triton output differs from the torch reference.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import os
import platform
import statistics
import sys
import time
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

PEER_MODULE = "modelopt.torch.kernels.quantization.gemm.fp4_kernel_hopper"
PEER_FALLBACK_MODULES = (
    "modelopt.torch.kernels.quantization.gemm",
    "modelopt.torch.kernels.quantization",
    "modelopt.torch.kernels",
    "modelopt.torch.quantization.triton",
)
COPY_TARGET = 0.85
MODELOPT_TARGET = 1.3

_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s] {msg}", flush=True)


def parse_shape(text: str) -> tuple[int, int]:
    try:
        m, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 8192x8192, got {text!r}") from None
    if m <= 0 or n <= 0 or n % 16:
        raise argparse.ArgumentTypeError(f"shape {text!r}: both sides positive, columns a multiple of 16")
    return m, n


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [parse_shape(t) for t in text.split(",") if t.strip()]


def parse_ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench_numerics.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--results", default=str(DEFAULT_RESULTS),
                   help="markdown file the results section is appended to (default: %(default)s)")
    p.add_argument("--shape", type=parse_shape, default=(8192, 8192),
                   help="main benchmark shape, bf16 (default: 8192x8192)")
    p.add_argument("--sweep-shapes", type=parse_shapes, default=parse_shapes("8192x8192,4096x4096,16384x8192"),
                   help="shapes for the launch sweep, comma-separated (default: 8192x8192,4096x4096,16384x8192)")
    p.add_argument("--blocks", type=parse_ints, default=[32, 64, 128, 256],
                   help="FAKE_QUANT_BLOCKS values to sweep, powers of two (default: 32,64,128,256)")
    p.add_argument("--warps", type=parse_ints, default=[2, 4, 8],
                   help="FAKE_QUANT_WARPS values to sweep (default: 2,4,8)")
    p.add_argument("--no-sweep", action="store_true", help="skip the launch sweep")
    p.add_argument("--no-modelopt", action="store_true", help="do not import or time ModelOpt")
    p.add_argument("--inputs", type=int, default=3, help="tensors the timed calls rotate among (default: 3)")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved timing rounds for the main table; the median is reported (default: 3)")
    p.add_argument("--warmup-ms", type=float, default=25, help="do_bench warm-up budget in ms (default: 25)")
    p.add_argument("--rep-ms", type=float, default=100, help="do_bench timed budget in ms (default: 100)")
    p.add_argument("--seed", type=int, default=0, help="torch seed of the random inputs (default: 0)")
    p.add_argument("--time-budget", type=float, default=150,
                   help="seconds after which no further sweep shape is started (default: 150)")
    args = p.parse_args(argv)
    args.inputs = max(1, args.inputs)
    args.rounds = max(1, args.rounds)
    return args


# --------------------------------------------------------------------------------------------- the peer


def load_peer():
    """-> (fn or None, where it was found or why it is missing, modelopt version or None)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import modelopt
        version = getattr(modelopt, "__version__", "unknown")
    except Exception as exc:  # noqa: BLE001 (any import failure means the peer is missing)
        return None, f"import modelopt failed: {short_error(exc)}", None
    errors = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in (PEER_MODULE, *PEER_FALLBACK_MODULES):
            try:
                fn = getattr(importlib.import_module(name), "fp4_fake_quant_block", None)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"{name}: {short_error(exc, 120)}")
                continue
            if callable(fn):
                return fn, name, version
        try:
            import pkgutil

            pkg = importlib.import_module("modelopt.torch.kernels")
            for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".", onerror=lambda _name: None):
                if "fp4" not in info.name:
                    continue
                try:
                    fn = getattr(importlib.import_module(info.name), "fp4_fake_quant_block", None)
                except Exception:  # noqa: BLE001
                    continue
                if callable(fn):
                    return fn, info.name, version
        except Exception as exc:  # noqa: BLE001
            errors.append(f"walk modelopt.torch.kernels: {short_error(exc, 120)}")
    return None, "fp4_fake_quant_block not found (" + "; ".join(errors)[:300] + ")", version


def peer_caller(fn, x, amax):
    """ModelOpt 0.47 calls fp4_fake_quant_block(inputs, amax) with block_size defaulting to 16; pass 16
    explicitly where the signature has it."""
    try:
        fn(x, amax, block_size=16)
        return lambda x, a: fn(x, a, block_size=16)
    except TypeError:
        fn(x, amax)
        return fn


# --------------------------------------------------------------------------------------------- helpers


def make_inputs(torch, shape, count, seed):
    out = []
    for i in range(count):
        g = torch.Generator(device="cuda")
        g.manual_seed(seed + 1000 * i)
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g)
        out.append((x, x.abs().amax().float()))  # float32 0-dim tensor on the GPU
    return out


def rotating(fn, inputs):
    cycle = itertools.cycle(inputs)

    def call():
        x, amax = next(cycle)
        return fn(x, amax)

    return call


def fmt_ms(ms):
    return "-" if ms is None else f"{ms:.4f}"


def gbps(nbytes, ms):
    return None if ms is None else nbytes / (ms * 1e-3) / 1e9


def fmt_gbps(nbytes, ms):
    return "-" if ms is None else f"{gbps(nbytes, ms):,.0f}"


def pct(ms_ref, ms):
    return "-" if ms is None or ms_ref is None else f"{100.0 * ms_ref / ms:.1f}%"


def shape_str(shape):
    return f"{shape[0]}x{shape[1]}"


def bits_differ(torch, a, b) -> int:
    return int((a.view(torch.int16) != b.view(torch.int16)).sum().item())


# --------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(f"bench_numerics: CUDA is not available (torch {torch.__version__} sees no GPU); "
              "this benchmark needs one CUDA GPU.", file=sys.stderr)
        return 1

    import triton

    from dist_quant.kernels import nvfp4_fake_quant as dispatch_fake_quant
    from dist_quant.kernels import nvfp4_triton as K
    from dist_quant.numerics import nvfp4_fake_quant as ref_fake_quant

    props = torch.cuda.get_device_properties(0)
    gpu = torch.cuda.get_device_name()
    l2 = getattr(props, "L2_cache_size", 0) / 2**20
    log(f"GPU {gpu}: {props.multi_processor_count} SMs, {l2:.0f} MiB L2, {props.total_memory / 2**30:.0f} GiB; "
        f"torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}")
    default_blocks, default_warps = K.FAKE_QUANT_BLOCKS, K.FAKE_QUANT_WARPS

    if args.no_modelopt:
        peer, peer_where, mo_version = None, "disabled by --no-modelopt", None
    else:
        log("importing ModelOpt ...")
        peer, peer_where, mo_version = load_peer()
        log(f"ModelOpt {mo_version}: " + (f"fp4_fake_quant_block from {peer_where}" if peer else peer_where))
    peer_missing = None if peer else f"peer missing: {peer_where}"

    def ours(x, a):
        return K.triton_nvfp4_fake_quant(x, a)

    # ---- correctness on the benchmark tensor (also compiles / warms every path)
    shape = args.shape
    inputs = make_inputs(torch, shape, args.inputs, args.seed)
    x0, a0 = inputs[0]
    numel = x0.numel()
    nbytes = 2 * numel * x0.element_size()
    log(f"main shape {shape_str(shape)} bf16, {args.inputs} rotating inputs, GB/s counts {nbytes / 2**20:.0f} MiB")
    checks = {}
    ours0 = ours(x0, a0)
    ref0 = ref_fake_quant(x0, a0)
    torch.cuda.synchronize()
    n_bad = bits_differ(torch, ours0, ref0)
    checks["bit_equal"] = n_bad == 0
    checks["bit_line"] = (f"Triton == torch reference bit for bit on {shape_str(shape)}: "
                          f"{'PASS' if n_bad == 0 else 'FAIL'} ({n_bad} of {numel} elements differ)")
    log(checks["bit_line"])
    try:
        n_disp = bits_differ(torch, dispatch_fake_quant(x0, a0), ours0)
        checks["dispatch"] = "same as the kernel" if n_disp == 0 else f"{n_disp} elements differ from the kernel"
    except Exception as exc:  # noqa: BLE001
        checks["dispatch"] = f"error: {short_error(exc)}"
    mse_ours = float((ours0.float() - x0.float()).pow(2).mean().item())
    del ref0
    peer_call = None
    if peer is not None:
        try:
            peer_call = peer_caller(peer, x0, a0)
            mo0 = peer_call(x0, a0)
            torch.cuda.synchronize()
            diff = (mo0.float() - ours0.float()).abs()
            n_mo = bits_differ(torch, mo0, ours0)
            mse_mo = float((mo0.float() - x0.float()).pow(2).mean().item())
            checks["peer_line"] = (
                f"ModelOpt vs ours (informational): max |diff| = {diff.max().item():.6g}, "
                f"{n_mo} of {numel} elements differ ({100.0 * n_mo / numel:.4f}%); "
                f"MSE vs input: ours {mse_ours:.6g}, ModelOpt {mse_mo:.6g}")
            del mo0, diff
        except Exception as exc:  # noqa: BLE001
            peer_call = None
            peer_missing = f"peer failed: {short_error(exc)}"
    if "peer_line" not in checks:
        checks["peer_line"] = f"ModelOpt vs ours (informational): n/a ({peer_missing}); MSE vs input: ours {mse_ours:.6g}"
    log(checks["peer_line"])
    del ours0
    torch.cuda.empty_cache()

    # ---- main timings: interleaved rounds, median of the round medians
    dst = torch.empty_like(x0)
    rows = {
        "copy": rotating(lambda x, a: dst.copy_(x), inputs),
        "ours": rotating(ours, inputs),
        "dispatch": rotating(dispatch_fake_quant, inputs),
    }
    if peer_call is not None:
        rows["modelopt"] = rotating(peer_call, inputs)
    samples = {k: [] for k in rows}
    errors = {}
    for r in range(args.rounds):
        for name, fn in rows.items():
            if name in errors:
                continue
            try:
                samples[name].append(cuda_time_ms(fn, args.warmup_ms, args.rep_ms))
            except Exception as exc:  # noqa: BLE001
                errors[name] = short_error(exc)
        log(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{k} {v[-1]:.4f} ms" for k, v in samples.items() if v and k not in errors))
    t = {k: (statistics.median(v) if v and k not in errors else None) for k, v in samples.items()}
    log("timing the torch reference ...")
    try:
        t["reference"] = cuda_time_ms(rotating(ref_fake_quant, inputs), args.warmup_ms, args.rep_ms)
    except Exception as exc:  # noqa: BLE001
        t["reference"], errors["reference"] = None, short_error(exc)
    torch.cuda.empty_cache()
    t_copy, t_ours, t_mo = t.get("copy"), t.get("ours"), t.get("modelopt")

    # ---- launch sweep
    sweep_rows, best_lines, sweep_notes = [], [], []
    shapes = []
    for s in [shape] + list(args.sweep_shapes):
        if s not in shapes:
            shapes.append(s)
    if args.no_sweep:
        shapes = []
        sweep_notes.append("sweep skipped (--no-sweep)")
    try:
        for s in shapes:
            if time.monotonic() - _T0 > args.time_budget:
                sweep_notes.append(f"{shape_str(s)} skipped (time budget {args.time_budget:.0f} s spent)")
                continue
            if s == shape:
                s_inputs, s_copy, s_mo = inputs, t_copy, t_mo
            else:
                s_inputs = make_inputs(torch, s, max(args.inputs, 1), args.seed)
                s_dst = torch.empty_like(s_inputs[0][0])
                s_copy = s_mo = None
                try:
                    s_copy = cuda_time_ms(rotating(lambda x, a, d=s_dst: d.copy_(x), s_inputs),
                                          args.warmup_ms, args.rep_ms)
                except Exception as exc:  # noqa: BLE001
                    sweep_notes.append(f"{shape_str(s)} copy failed: {short_error(exc)}")
                if peer_call is not None:
                    try:
                        s_mo = cuda_time_ms(rotating(peer_call, s_inputs), args.warmup_ms, args.rep_ms)
                    except Exception as exc:  # noqa: BLE001
                        sweep_notes.append(f"{shape_str(s)} ModelOpt failed: {short_error(exc)}")
                del s_dst
            sx0, sa0 = s_inputs[0]
            s_bytes = 2 * sx0.numel() * sx0.element_size()
            s_ref = ref_fake_quant(sx0, sa0)
            best = None
            for blocks in args.blocks:
                for warps in args.warps:
                    K.FAKE_QUANT_BLOCKS, K.FAKE_QUANT_WARPS = blocks, warps
                    tag = " (default)" if (blocks, warps) == (default_blocks, default_warps) else ""
                    try:
                        n_bad_v = bits_differ(torch, ours(sx0, sa0), s_ref)
                        ms = cuda_time_ms(rotating(ours, s_inputs), args.warmup_ms, args.rep_ms)
                    except Exception as exc:  # noqa: BLE001
                        sweep_rows.append([shape_str(s), f"{blocks}{tag}", warps, "-", "-", "-", "-",
                                           f"error: {short_error(exc, 100)}"])
                        continue
                    finally:
                        K.FAKE_QUANT_BLOCKS, K.FAKE_QUANT_WARPS = default_blocks, default_warps
                    if n_bad_v == 0 and (best is None or ms < best[0]):
                        best = (ms, blocks, warps)
                    sweep_rows.append([
                        shape_str(s), f"{blocks}{tag}", warps, fmt_ms(ms), fmt_gbps(s_bytes, ms), pct(s_copy, ms),
                        "-" if s_mo is None else f"{s_mo / ms:.2f}x",
                        "yes" if n_bad_v == 0 else f"NO ({n_bad_v} differ)"])
            if best is not None:
                best_lines.append(
                    f"{shape_str(s)}: best BLOCKS={best[1]}, WARPS={best[2]}: {best[0]:.4f} ms, "
                    f"{gbps(s_bytes, best[0]):,.0f} GB/s, {pct(s_copy, best[0])} of copy"
                    + ("" if s_copy is None else f" (copy {s_copy:.4f} ms, {gbps(s_bytes, s_copy):,.0f} GB/s)")
                    + ("" if s_mo is None else f"; ModelOpt {s_mo:.4f} ms (ModelOpt time / this = {s_mo / best[0]:.2f}x)"))
            log(f"sweep {shape_str(s)} done" + (f": {best_lines[-1]}" if best is not None else ""))
            del s_ref, sx0, sa0, s_inputs
            torch.cuda.empty_cache()
    finally:
        K.FAKE_QUANT_BLOCKS, K.FAKE_QUANT_WARPS = default_blocks, default_warps

    # ---- report
    def verdict(ok):
        return "PASS" if ok else "MISS"

    if t_ours is not None and t_copy is not None:
        r_copy = t_copy / t_ours
        head_copy = (f"ours / copy bandwidth: {100 * r_copy:.1f}% (target >= {100 * COPY_TARGET:.0f}%): "
                     f"{verdict(r_copy >= COPY_TARGET)}")
    else:
        head_copy = f"ours / copy bandwidth: n/a ({errors.get('ours') or errors.get('copy')})"
    if t_ours is not None and t_mo is not None:
        r_mo = t_mo / t_ours
        head_mo = (f"ours / ModelOpt speedup: {r_mo:.2f}x (ModelOpt {t_mo:.4f} ms / ours {t_ours:.4f} ms; "
                   f"target >= {MODELOPT_TARGET}x): {verdict(r_mo >= MODELOPT_TARGET)}")
    else:
        head_mo = f"ours / ModelOpt speedup: n/a ({errors.get('modelopt') or peer_missing or errors.get('ours')})"

    def main_row(label, key, note=""):
        ms = t.get(key)
        if ms is None:
            reason = errors.get(key) or (peer_missing if key == "modelopt" else "not timed")
            return [label, "-", "-", "-", "-", reason]
        vs = "-" if t_ours is None else f"{ms / t_ours:.2f}x"
        return [label, fmt_ms(ms), fmt_gbps(nbytes, ms), pct(t_copy, ms), vs, note]

    main_table = md_table(
        ["what", "ms (median)", "GB/s", "% of copy bw", "time / ours", "note"],
        [
            main_row("device-to-device copy (`dst.copy_(src)`)", "copy", "the ceiling"),
            main_row("ours: `triton_nvfp4_fake_quant`", "ours",
                     f"BLOCKS={default_blocks}, WARPS={default_warps}; {checks['bit_line'].split(': ', 1)[1]}"),
            main_row("ours via dispatcher `dist_quant.kernels.nvfp4_fake_quant`", "dispatch", checks["dispatch"]),
            main_row("our torch reference `dist_quant.numerics.nvfp4_fake_quant`", "reference"),
            main_row("ModelOpt `fp4_fake_quant_block(x, amax, block_size=16)`", "modelopt",
                     f"from {peer_where}" if peer_call is not None else ""),
        ],
    )
    versions = (f"python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}, "
                f"modelopt {mo_version or 'not importable'}")
    parts = [
        f"## bench_numerics: NVFP4 fake quant, bf16 {shape_str(shape)} ({utc_now()})",
        "",
        f"- GPU: {gpu} ({props.multi_processor_count} SMs, {l2:.0f} MiB L2)",
        f"- versions: {versions}",
        f"- command: `{command_line()}`",
        f"- timing: median of {args.rounds} interleaved rounds of triton.testing.do_bench median "
        f"(warm-up {args.warmup_ms:g} ms, rep {args.rep_ms:g} ms, L2 cleared per call), rotating among "
        f"{args.inputs} inputs; GB/s = (bytes read + bytes written) / time = 2 x {nbytes // 2 / 2**20:.0f} MiB / time",
        f"- launch defaults during the run: FAKE_QUANT_BLOCKS={default_blocks}, FAKE_QUANT_WARPS={default_warps}",
        "",
        "Headline:",
        f"- {head_copy}",
        f"- {head_mo}",
        f"- correctness: {checks['bit_line']}",
        f"- {checks['peer_line']}",
    ]
    if shapes or sweep_notes:
        parts += ["", "### Launch sweep of ours (`FAKE_QUANT_BLOCKS` x `FAKE_QUANT_WARPS`)", ""]
        if sweep_rows:
            parts.append(md_table(
                ["shape", "BLOCKS", "WARPS", "ms", "GB/s", "% of copy bw", "ModelOpt time / this", "bit-equal"],
                sweep_rows))
            parts.append("")
        parts += [f"- {line}" for line in best_lines + sweep_notes]
    parts += ["", f"### Main table, bf16 {shape_str(shape)}", "", main_table]
    section = "\n".join(parts)

    try:
        where = append_results(args.results, section)
        saved = f"appended to {where}"
    except OSError as exc:
        saved = f"could NOT append to {args.results}: {short_error(exc)}"
    log(f"results {saved}; total {time.monotonic() - _T0:.1f} s")
    print("\n" + section, flush=True)

    if t_ours is None:
        return 2
    if not checks["bit_equal"]:
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
