"""The `dist-quant` command (also `python -m dist_quant.cli`)."""

from __future__ import annotations

import argparse
import sys

from dist_quant.recipe import RecipeError, builtin_recipe_names, load_recipe
from dist_quant.recipe.schema import Recipe

# Quantizer names of a typical layer, to show what a recipe does to each.
EXAMPLE_QUANTIZERS = (
    "model.layers.0.self_attn.q_proj.weight_quantizer",
    "model.layers.0.self_attn.q_proj.input_quantizer",
    "model.layers.0.self_attn.k_bmm_quantizer",
    "model.layers.0.self_attn.v_bmm_quantizer",
    "model.layers.0.mlp.gate.weight_quantizer",
    "model.layers.0.mlp.experts.0.gate_proj.weight_quantizer",
    "model.layers.0.mlp.experts.0.down_proj.input_quantizer",
    "model.layers.0.mlp.down_proj.weight_quantizer",
    "lm_head.weight_quantizer",
)


def _describe(recipe: Recipe) -> str:
    algorithm = recipe.algorithm
    lines = [
        f"recipe {recipe.source}",
        f"  {recipe.description}" if recipe.description else "",
        f"  algorithm: {algorithm.method}" + (", fp8 scale sweep" if algorithm.fp8_scale_sweep else ""),
        "  what it does to a typical layer:",
    ]
    width = max(map(len, EXAMPLE_QUANTIZERS))
    for name in EXAMPLE_QUANTIZERS:
        fmt = recipe.format_for(name)
        text = "off" if fmt is None else fmt.describe() + (" constant amax 448" if fmt.use_constant_amax else "")
        lines.append(f"    {name:<{width}}  {text}")
    return "\n".join(line for line in lines if line)


def _recipes(args: argparse.Namespace) -> None:
    if args.recipe:
        print(_describe(load_recipe(args.recipe)))
        return
    for name in builtin_recipe_names():
        print(f"{name:<38} {load_recipe(name).description}")


def _inspect(args: argparse.Namespace) -> None:
    from dist_quant.export import verify

    summary = verify(args.directory)
    print(f"{args.directory}: {summary['quant_algo']} weights, KV cache {summary['kv_cache_quant_algo'] or 'not quantized'}")
    print(f"  {summary['quantized_modules']} quantized modules, {summary['tensors']} tensors")
    print(f"  not quantized: {', '.join(summary['excluded']) or 'none'}")
    print("  verify: OK (keys, dtypes, shapes, config fields, finite scales, every expert, shared sibling scales)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dist-quant",
        description="Calibrate and export FP8 / NVFP4 quantized models sharded with tensor and expert parallelism.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    recipes = commands.add_parser(
        "recipes",
        help="list the built-in recipes, or validate one recipe and show what it quantizes",
        description="Without an argument, list the built-in recipes. With a built-in name or a YAML path, "
        "validate that recipe and show the format it gives to the quantizers of a typical layer.",
    )
    recipes.add_argument("recipe", nargs="?", help="a built-in recipe name or a path to a YAML recipe")
    recipes.set_defaults(run=_recipes)
    inspect = commands.add_parser(
        "inspect",
        help="summarize an exported checkpoint and verify it against the format rules",
        description="Print what a dist_quant / ModelOpt unified checkpoint holds and run verify() on it: exits "
        "non-zero with every problem listed if the checkpoint breaks the format.",
    )
    inspect.add_argument("directory", help="the exported checkpoint directory")
    inspect.set_defaults(run=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dist_quant.export import VerificationError

    try:
        args.run(args)
    except (RecipeError, VerificationError, FileNotFoundError) as error:
        print(f"dist-quant: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
