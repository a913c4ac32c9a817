"""The `dist-quant` command (also `python -m dist_quant.cli`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import dist_quant
from dist_quant.recipe import builtin_recipe_names, load_recipe
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
        text = "off" if fmt is None else fmt.describe() + (f" constant amax {fmt.number.largest:g}" if fmt.use_constant_amax else "")
        lines.append(f"    {name:<{width}}  {text}")
    return "\n".join(line for line in lines if line)


def _recipes(args: argparse.Namespace) -> None:
    if args.recipe:
        print(_describe(load_recipe(args.recipe)))
        return
    for name in builtin_recipe_names():
        print(f"{name:<38} {load_recipe(name).description}")


def _megabytes(done: int, total: int) -> tuple[int, int]:
    """Bytes as whole MB: the total rounded up (any data is at least 1 MB), done rounded down until it is all."""
    whole = -(-total // 10**6)
    return (whole if done >= total else done // 10**6), whole


def _inspect(args: argparse.Namespace) -> None:
    from dist_quant.export import verify
    from dist_quant.progress import Progress, say

    files = sorted(Path(args.directory).glob("*.safetensors"))  # none where it is no directory: verify says so
    say(f"verifying {args.directory}: {len(files)} safetensors files, {sum(f.stat().st_size for f in files) / 1e9:.2f} GB")
    with Progress("checking values", "MB") as progress:
        summary = verify(args.directory, on_progress=lambda done, total: progress.at(*_megabytes(done, total)))
    form = " (the engines' native fp8 form)" if summary["quant_method"] == "fp8" else ""
    print(f"{args.directory}: {summary['quant_algo']} weights{form}, KV cache {summary['kv_cache_quant_algo'] or 'not quantized'}")
    print(f"  {summary['quantized_modules']} quantized modules, {summary['tensors']} tensors")
    print(f"  not quantized: {', '.join(summary['excluded']) or 'none'}")
    print(
        "  verify: OK (every tensor config.json describes, with its dtype and shape; configs and index agree; "
        "finite scales; shared sibling scales)"
    )
    for warning in summary["warnings"]:
        print(f"  warning: {warning}")


def _calibrate(args: argparse.Namespace) -> None:
    from dist_quant import job

    job.validate(args)
    job.run(args)


def _launch(args: argparse.Namespace) -> int:
    from dist_quant.launcher import launch

    if args.nproc_per_node < 1:
        build_parser().error("launch: --nproc-per-node must be at least 1")
    build_parser().parse_args(["calibrate", *args.arguments])  # usage errors and --help here, not on every rank
    return launch(args.nproc_per_node, ["calibrate", *args.arguments], args.verbose)


def _add_launch(commands) -> None:
    launch = commands.add_parser(
        "launch",
        help="run `calibrate` on N local ranks (as torchrun --standalone does), failing with one line and exit status 2",
        description="Start N ranks of `dist-quant calibrate` on this machine through torch's elastic launcher, with "
        "torchrun --standalone's rendezvous (a store on a free port), and end as the job does: one line "
        "(dist-quant: error: rank N: ...) and exit status 2 when it fails, 1 for an internal error (its traceback "
        "above) or a rank killed. torchrun itself runs the same job but exits 1 and prints its report after the "
        "job's line; --verbose shows that report and the launcher's log. Example: dist-quant launch "
        "--nproc-per-node 4 calibrate --model tiny-qwen3-moe --recipe nvfp4_default-fp8_cast_kv --tp 2 --ep 2 "
        "--out out/tiny. For several machines run torchrun on each.",
    )
    launch.add_argument("--nproc-per-node", type=int, default=1, metavar="N", help="ranks to start (default 1): one per GPU")
    launch.add_argument("--verbose", action="store_true", help="also show torchrun's report of a failed job and its log")
    launch.add_argument("job", choices=["calibrate"], help="the command each rank runs")
    launch.add_argument("arguments", nargs=argparse.REMAINDER, help="its arguments (see dist-quant calibrate --help)")
    launch.set_defaults(run=_launch)


def _add_calibrate(commands) -> None:
    from dist_quant.bridge.architectures import ARCHITECTURES
    from dist_quant.job import builtin_models

    calibrate = commands.add_parser(
        "calibrate",
        help="calibrate a TP/EP-sharded model and export a quantized HF checkpoint (run under torchrun)",
        description="Load a model (a Hugging Face checkpoint, or a built-in tiny config with random weights), "
        "shard it with megatron-core over the ranks `dist-quant launch` (or torchrun) started (gloo on CPU, NCCL "
        "on GPUs), calibrate it with a recipe on calibration data, and export a checkpoint vLLM loads. Example: "
        "dist-quant launch --nproc-per-node 4 calibrate --model tiny-qwen3-moe --recipe nvfp4_default-fp8_cast_kv "
        "--tp 2 --ep 2 --out out/tiny",
    )
    source = calibrate.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--hf-model", metavar="DIR",
        help=f"a Hugging Face checkpoint directory of one of the architectures {', '.join(ARCHITECTURES)} (a hub "
        "model must be downloaded first: hf download ORG/NAME --local-dir DIR); unquantized, or FP8 block-scaled "
        "(quant_method fp8, as DeepSeek-V3 ships), whose weights are dequantized on load",
    )
    source.add_argument("--model", metavar="NAME", help=f"a built-in config with random weights: {', '.join(builtin_models())}")
    calibrate.add_argument("--recipe", required=True, help="built-in recipe name (see `dist-quant recipes`) or YAML path")
    calibrate.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    calibrate.add_argument("--ep", type=int, default=1, help="expert-parallel size (default 1)")
    calibrate.add_argument("--etp", type=int, default=None, help="expert tensor-parallel size (default: --tp)")
    calibrate.add_argument(
        "--pp", type=int, default=1,
        help="pipeline-parallel size (default 1); world = TP x PP x DP, and EP x ETP must divide world / PP",
    )
    calibrate.add_argument("--pp-first-layers", type=int, default=None, metavar="N", help="layers on the first pipeline stage (uneven split)")
    calibrate.add_argument("--pp-last-layers", type=int, default=None, metavar="N", help="layers on the last pipeline stage (uneven split)")
    calibrate.add_argument(
        "--calib-data", metavar="FILE|DIR|NAME",
        help="calibration data: a text file (one sample document per paragraph, paragraphs separated by blank "
        "lines), a .jsonl file (one document per line), a dataset directory (datasets' save_to_disk, or a dataset "
        "repository on disk) or a Hugging Face dataset name (e.g. abisee/cnn_dailymail); records give text, chat "
        "messages (the tokenizer's chat template) or token ids. Default: a built-in text, repeated as needed "
        "(enough to try the job). Datasets need pip install 'dist_quant[data]'",
    )
    calibrate.add_argument("--calib-subset", metavar="NAME", help="the dataset's subset (configuration), e.g. 3.0.0 for abisee/cnn_dailymail")
    calibrate.add_argument("--calib-split", metavar="SPLIT", help="the dataset's split (default train), slices too: 'train[:1000]'")
    calibrate.add_argument(
        "--calib-column", metavar="NAME",
        help="the column (jsonl field) to read; default: the first of input_ids (token ids), messages (chat), text",
    )
    calibrate.add_argument("--calib-samples", type=int, default=32, help="calibration samples, at most (default 32)")
    calibrate.add_argument("--seq-len", type=int, default=64, help="tokens per sample (default 64)")
    calibrate.add_argument(
        "--pack", choices=("concat", "truncate"), default="concat",
        help="how documents become samples of --seq-len tokens, with no padding: concat joins them (each ended by "
        "the tokenizer's EOS token) and cuts the stream (default); truncate takes each document's first --seq-len "
        "tokens and skips shorter ones",
    )
    calibrate.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    calibrate.add_argument(
        "--out", required=True, metavar="DIR",
        help="checkpoint directory to write: a new path, or with --overwrite an earlier dist_quant checkpoint (never "
        "the current directory, a mount point or the source); it appears only complete and verified",
    )
    calibrate.add_argument("--overwrite", action="store_true", help="replace --out, a dist_quant checkpoint, in one step")
    calibrate.add_argument(
        "--export-writers", choices=("one", "all"), default="one",
        help="one: rank 0 gathers and writes every tensor (default); all: each rank writes the tensors whose first "
        "piece it holds, into --out's file system (which every rank must see); the same tensors either way",
    )
    calibrate.add_argument(
        "--timeout", type=float, default=10.0, metavar="MINUTES",
        help="how long a collective waits for the other ranks before the job fails (default 10; torch's and "
        "megatron's default is 30)",
    )
    calibrate.add_argument("--seed", type=int, default=0, help="seed of the built-in models' random weights (default 0)")
    calibrate.add_argument(
        "--random-weights", action="store_true",
        help="draw random weights on each rank's own device (megatron-core's initialization) instead of reading a "
        "checkpoint: nothing is written first, so it suits large configs and timing runs; the weights depend on "
        "the layout. With --hf-model only its config.json and tokenizer are used",
    )
    calibrate.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default=None,
        help="compute dtype on the ranks (default: the checkpoint's, from dtype / torch_dtype in config.json, float32 "
        "where it names none); unquantized tensors are exported in the checkpoint's own dtypes either way",
    )
    calibrate.add_argument(
        "--report", metavar="DIR",
        help="write a calibration report into DIR: every quantizer's amax and every quantized weight's error as "
        "JSON, and a PNG of both by layer (needs pip install 'dist_quant[report]')",
    )
    calibrate.set_defaults(run=_calibrate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dist-quant",
        description="Calibrate and export FP8 / NVFP4 quantized models sharded with tensor and expert parallelism.",
    )
    parser.add_argument("--version", action="version", version=f"dist-quant {dist_quant.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_launch(commands)
    _add_calibrate(commands)
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


def _failed(message: str, reporter: bool) -> int:
    """One line for the user, once: the reporting rank prints it, or `dist-quant launch`, which started the ranks,
    from the error file every rank leaves (so that no rank can be ended before it has told). -> exit status 2."""
    from dist_quant.launcher import LAUNCHED, record_error

    record_error(message)
    if reporter and LAUNCHED not in os.environ:
        print(f"dist-quant: error: {message}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dist_quant.job import rank, user_errors
    from dist_quant.parallel.agree import RankError

    try:
        return args.run(args) or 0
    except (*user_errors(), FileNotFoundError) as error:
        # every rank raises the same first error: rank 0 tells it, unless the error names another (a stall)
        return _failed(str(error), error.reporter if isinstance(error, RankError) else rank() == 0)


if __name__ == "__main__":
    sys.exit(main())
