#!/usr/bin/env python3
"""Compare two exported checkpoints of the same model calibrated at different layouts (e.g. TP2 and EP2): the
same tensor names, dtypes and shapes, and weight-derived tensors (packed weights, weight scales, unquantized
tensors) equal byte for byte; exit 1 otherwise, listing the differences. Activation-derived scales (input_scale,
k_scale, v_scale) are summarized: sharded forwards sum in another order, and in bf16 that can flip a router's
choice for a token, so an expert's input amax may move; with --rtol they must agree to it.

    python3 benchmarks/compare_exports.py /tmp/out-tp2 /tmp/out-ep2
"""

from __future__ import annotations

import argparse
import sys

from _common import REPO_ROOT  # noqa: F401  (puts the repository on sys.path)

import torch  # noqa: E402

ACTIVATION_SCALES = (".input_scale", ".k_scale", ".v_scale")


def compare(a: str, b: str, rtol: float | None) -> tuple[list[str], dict]:
    from dist_quant.export import load_tensors

    left, right = load_tensors(a), load_tensors(b)
    problems = [f"only in {a}: {n}" for n in sorted(left.keys() - right.keys())]
    problems += [f"only in {b}: {n}" for n in sorted(right.keys() - left.keys())]
    stats = {"weight-derived": 0, "activation-derived": 0, "max activation rel diff": 0.0, "above 1%": 0}
    for name in sorted(left.keys() & right.keys()):
        x, y = left[name], right[name]
        if x.dtype != y.dtype or x.shape != y.shape:
            problems.append(f"{name}: {x.dtype} {tuple(x.shape)} vs {y.dtype} {tuple(y.shape)}")
        elif name.endswith(ACTIVATION_SCALES):
            stats["activation-derived"] += 1
            diff = ((x.float() - y.float()).abs() / y.float().abs()).max().item()
            stats["max activation rel diff"] = max(stats["max activation rel diff"], diff)
            stats["above 1%"] += diff > 1e-2
            if rtol is not None and diff > rtol:
                problems.append(f"{name}: {x.item()} vs {y.item()} (relative {diff:.2e} > {rtol})")
        else:
            stats["weight-derived"] += 1
            if not torch.equal(x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x,
                               y.view(torch.uint8) if y.dtype == torch.float8_e4m3fn else y):
                problems.append(f"{name}: weight-derived tensors differ")
    return problems, stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--rtol", type=float, default=None, help="fail where activation-derived scales differ by more")
    args = parser.parse_args()
    problems, stats = compare(args.a, args.b, args.rtol)
    print(f"{args.a} vs {args.b}: {stats['weight-derived']} weight-derived tensors, {stats['activation-derived']} "
          f"activation scales (max relative difference {stats['max activation rel diff']:.2e}, "
          f"{stats['above 1%']} above 1%)")
    for problem in problems[:30]:
        print(f"  {problem}")
    print("  identical where they must be" if not problems else f"  {len(problems)} differences")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
