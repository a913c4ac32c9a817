"""The calibrate job behind `dist-quant calibrate`: model from an HF checkpoint or a built-in tiny config,
calibration data (dist_quant/calibration_data.py), TP/EP-sharded calibration, export, a summary a person can
read and, with --report, a calibration report (dist_quant/report.py). Run on every rank."""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dist_quant.parallel.megatron_compat import layout_problem
from dist_quant.progress import Progress, duration, say

# The built-in models' config.json files, package data (they ship in the wheel)
CONFIGS = Path(__file__).resolve().parent / "data" / "models"
# Built-in configs up to this many parameters get their random weights written once as a checkpoint (the same
# weights for every layout); larger ones need --random-weights.
BUILTIN_CHECKPOINT_LIMIT = 4_000_000_000
# --timeout at most: a collective that waits longer has hung, and more only hides it (inf is no timedelta at all)
MAX_TIMEOUT_MINUTES = 7 * 24 * 60
# A Hugging Face hub id (`owner/name`), which --hf-model may be given by mistake for a directory
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class JobError(ValueError):
    """Bad input to the job: printed as one line, exit status 2."""


def builtin_models() -> list[str]:
    return sorted(p.stem for p in CONFIGS.glob("*.json")) if CONFIGS.is_dir() else []


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors that are the user's input, not a bug: one line, exit status 2."""
    from dist_quant.bridge import BridgeError
    from dist_quant.calibrate import CalibrationError
    from dist_quant.export import ExportError, OutputError, VerificationError
    from dist_quant.parallel.agree import RankError
    from dist_quant.recipe import RecipeError

    return (JobError, BridgeError, CalibrationError, ExportError, OutputError, VerificationError, RecipeError, RankError)


def validate(args: argparse.Namespace) -> None:
    """Everything checkable before any rank starts heavy work: layout, files, calibration data, output path, the
    model's config.json; the same verdict on every rank. Resolves the default --dtype (the checkpoint's) and
    makes the calibration samples (`args.calibration`)."""
    from dist_quant.export import check_exportable
    from dist_quant.export.side_files import check_side_files
    from dist_quant.recipe import load_recipe

    world = world_size()
    for name in ("tp", "ep", "etp", "pp", "pp_first_layers", "pp_last_layers", "calib_samples", "seq_len", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise JobError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.seed < 2**32:  # megatron adds per-rank offsets to it, and the sum must stay a 64-bit seed
        raise JobError(f"--seed must be a number from 0 to 2^32 - 1, not {args.seed}")
    if not 0 < args.timeout <= MAX_TIMEOUT_MINUTES:
        raise JobError(f"--timeout must be a positive number of minutes, at most {MAX_TIMEOUT_MINUTES} (a week), not {args.timeout:g}")
    problem = layout_problem(world, args.tp, args.ep, args.etp, args.pp)
    if problem:
        raise JobError(f"{problem}; run torchrun with a matching --nproc-per-node, e.g. {args.tp * args.ep * args.pp}")
    if args.hf_model is not None:
        _check_hf_model(args.hf_model)
        check_side_files(args.hf_model)  # that the export will copy: refused now, not after the calibration
    if args.model is not None and args.model not in builtin_models():
        raise JobError(f"--model {args.model}: unknown; built-in models: {', '.join(builtin_models()) or 'none found'}")
    problem = output_target(args).problem()
    if problem:
        raise JobError(f"--out {problem}")
    if args.report is not None:
        _check_report(args.report, args.out)
    recipe = load_recipe(args.recipe)
    bridge = model_bridge(args)
    args.dtype = args.dtype or _dtype_name(bridge.dtype)
    _check_size(args, bridge)  # before anything counts out the layers and experts, or allocates them
    bridge.check_layout(args.tp, args.ep, pipeline_split(args), args.etp)
    check_exportable(recipe, bridge)  # a recipe the checkpoint cannot hold fails here, not after calibration
    if args.hf_model is not None and not args.random_weights:
        from dist_quant.bridge.io import check_checkpoint, source_reader

        check_checkpoint(bridge, source_reader(args.hf_model, bridge))  # every tensor's name, shape and dtype (headers)
    if args.model is not None and not args.random_weights:
        cache_root()  # where the random weights are written: refused now if it cannot be
    args.calibration = calibration(args, bridge)


def _check_size(args: argparse.Namespace, bridge) -> None:
    """JobError where the model cannot be made: a built-in one too large to write as a checkpoint from one CPU
    first; any whose share of one rank cannot fit in its memory (every parameter is held by some rank, so with W
    ranks one of them holds at least 1/W of the model in the compute dtype; a rank's memory is its GPU's, or its
    share of the host's)."""
    from dist_quant.bridge.architectures import parameter_counts

    counts = parameter_counts(bridge.spec, bridge.config, bridge.forward, bridge.head_dim)
    params, world = sum(counts.values()), world_size()
    if args.model is not None and not args.random_weights and params > BUILTIN_CHECKPOINT_LIMIT:
        raise JobError(
            f"--model {args.model}: {params / 1e9:.1f}B parameters, too many to write as a random checkpoint "
            f"first ({params * bridge.dtype.itemsize / 1e9:.0f} GB from one CPU); add --random-weights to draw "
            "them on each rank's device"
        )
    size = params * getattr(torch, args.dtype).itemsize
    memory, where = rank_memory()
    if size / world > memory:
        source = f"--hf-model {args.hf_model}" if args.hf_model else f"--model {args.model}"
        largest = max(counts, key=counts.get)
        raise JobError(
            f"{source}: config.json describes {params / 1e9:,.1f}B parameters ({counts[largest] / 1e9:,.1f}B of them "
            f"in {largest}), {size / 1e9:,.0f} GB in {args.dtype}"
            + (", all on one rank" if world == 1 else f": one of the {world} ranks holds {size / world / 1e9:,.0f} GB or more")
            + f", more than {where}"
        )


def rank_memory() -> tuple[int, str]:
    """The memory a rank holds its part of the model in, and what it is: its GPU's (torchrun's LOCAL_RANK), or
    without CUDA the host's, shared by the host's ranks (LOCAL_WORLD_SIZE)."""
    if torch.cuda.is_available():
        device = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        memory = torch.cuda.get_device_properties(device).total_memory
        return memory, f"the {memory / 1e9:,.0f} GB of GPU {device}"
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return memory // ranks, f"the host's {memory / 1e9:,.0f} GB of memory" + (f" shared by {ranks} ranks" if ranks > 1 else "")


def _check_hf_model(value: str) -> None:
    path = Path(value)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise JobError(f"--hf-model {value}: no config.json there")
    elif _HUB_ID.fullmatch(value) and not path.exists():
        raise JobError(
            f"--hf-model {value}: no such directory; --hf-model takes a checkpoint on disk: for the Hugging Face model "
            f"{value}, download it first (hf download {value} --local-dir DIR) and give --hf-model DIR"
        )
    else:
        raise JobError(f"--hf-model {value}: no such directory")


def _check_report(value: str, out: str) -> None:
    """--report: a directory that can be made or written, outside the checkpoint (which holds only what it verifies)."""
    from dist_quant.bridge.io import is_inside

    path = Path(os.path.abspath(value))
    if path.exists() and not path.is_dir():
        raise JobError(f"--report {value} exists and is not a directory")
    if is_inside(path, Path(os.path.abspath(out))):
        raise JobError(f"--report {value} is inside --out {out}: give a directory of its own")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise JobError(f"--report {value}: cannot write in {existing}")


def calibration(args: argparse.Namespace, bridge):
    """The calibration samples (dist_quant/calibration_data.py): the built-in models' byte vocabularies, or the
    checkpoint's tokenizer (a checkpoint without one takes token ids only)."""
    from dist_quant import calibration_data

    encoding = calibration_data.checkpoint_encoding(args.hf_model) if args.hf_model else calibration_data.ByteEncoding()
    spec = calibration_data.DataSpec(args.calib_data, args.calib_subset, args.calib_split, args.calib_column)
    return calibration_data.load(spec, encoding, args.calib_samples, args.seq_len, args.pack, bridge.config.require("vocab_size"))


def pipeline_split(args: argparse.Namespace):
    from dist_quant.bridge.models import PipelineSplit

    return PipelineSplit(args.pp, args.pp_first_layers, args.pp_last_layers)


def output_target(args: argparse.Namespace):
    from dist_quant.export import OutputTarget

    return OutputTarget(args.out, args.overwrite, protected=[args.hf_model])


def model_bridge(args: argparse.Namespace):
    """The bridge of the model to calibrate, its config.json checked key by key for the calibration length."""
    from dist_quant.bridge import ModelBridge

    config = Path(args.hf_model) if args.hf_model else CONFIGS / f"{args.model}.json"
    return ModelBridge.from_hf(config, seq_len=args.seq_len)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def init_distributed(timeout: datetime.timedelta = datetime.timedelta(minutes=10)) -> torch.device:
    """NCCL with one GPU per rank where CUDA exists, gloo on CPU; a lone process without torchrun works too."""
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl" if cuda else "gloo"
        if "RANK" not in os.environ:  # alone: an in-memory store, no port to find free (another job may take it)
            os.environ.update(RANK="0", WORLD_SIZE="1")
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def cache_root() -> Path:
    """Where built-in models' random weights are kept: $DIST_QUANT_CACHE, else $XDG_CACHE_HOME/dist_quant (or
    ~/.cache/dist_quant). It must be the user's own and writable by no one else: what is there is trusted."""
    root = os.environ.get("DIST_QUANT_CACHE")
    root = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dist_quant"
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as error:
        why = "a file is in the way" if isinstance(error, (FileExistsError, NotADirectoryError)) else error.strerror
        raise JobError(
            f"{root}: cannot make the cache of built-in models there ({why}); set DIST_QUANT_CACHE to a directory "
            "of your own"
        ) from None
    info = root.lstat()
    if root.is_symlink() or info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise JobError(
            f"{root}: the cache of built-in models must be a directory of your own that no one else can write "
            f"(it is {'a link' if root.is_symlink() else oct(info.st_mode & 0o777)}, owner uid {info.st_uid}); "
            "fix it or set DIST_QUANT_CACHE"
        )
    return root


def builtin_config(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def builtin_checkpoint_dir(name: str, seed: int) -> Path:
    """Named by the config's and the seed's hash: a changed config never reuses old weights."""
    digest = hashlib.sha256(json.dumps([builtin_config(name), seed], sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / f"{name}-seed{seed}-{digest}"


def builtin_checkpoint(name: str, seed: int) -> Path:
    """Random weights for a built-in config, written once (rank 0) as an HF checkpoint into the user's cache (a
    fixed seed makes them the same for every layout), then read through the bridge like any checkpoint. The
    directory appears whole or not at all. Collective."""
    from dist_quant.parallel.agree import raised_together

    with raised_together(user_errors()):
        directory = builtin_checkpoint_dir(name, seed)
        if rank() == 0 and not directory.is_dir():
            import transformers

            say(f"writing the random weights of {name} to {directory} (once: later runs read them)")

            from dist_quant.bridge import ModelBridge

            raw = builtin_config(name)
            config = transformers.AutoConfig.for_model(**raw)
            torch.manual_seed(seed)
            model = transformers.AutoModelForCausalLM.from_config(config).to(ModelBridge.from_hf(raw).dtype)
            partial = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
            model.save_pretrained(partial)
            try:
                partial.rename(directory)
            except OSError:  # another job wrote it meanwhile: same seed and config, same weights
                shutil.rmtree(partial)
    return directory


def replica_samples(count: int, replica: int, replicas: int, batch: int = 1) -> list[int]:
    """Indices of the samples one data-parallel replica calibrates on: its strided share, wrapped around so that
    every replica gets the same number, ceil(count / replicas) rounded up to whole batches. Every replica then
    runs as many forward steps of one shape (MoE token exchanges span replicas, and pipeline stages pass
    microbatches of one shape: a step more or a shape apart would wait forever), and a repeated sample changes
    no maximum."""
    share = -(-count // replicas)
    return [(replica + k * replicas) % count for k in range(-(-share // batch) * batch)]


def calibration_batches(samples: torch.Tensor, batch_size: int, dp_rank: int, dp_size: int) -> list[torch.Tensor]:
    """This data-parallel rank's share of the samples [count, seq_len] as token batches, as many and of one shape
    [batch, seq_len] on every rank (batch: `batch_size`, or the share if smaller)."""
    count = samples.shape[0]
    batch = min(batch_size, -(-count // dp_size))
    return list(samples[replica_samples(count, dp_rank, dp_size, batch)].split(batch))


class Timer:
    """Seconds per stage, and on a GPU the peak memory allocated during each."""

    def __init__(self, device: torch.device | None = None):
        self.stages: dict[str, float] = {}
        self.peaks: dict[str, int] = {}
        self.gpu = device is not None and device.type == "cuda"

    @contextmanager
    def stage(self, name: str):
        if self.gpu:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        yield
        self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - start
        if self.gpu:
            self.peaks[name] = max(self.peaks.get(name, 0), torch.cuda.max_memory_allocated())


def _on_lead(value) -> list | None:
    """Every rank's `value` (picklable), in rank order, on rank 0; None on the others. Collective."""
    if world_size() == 1:
        return [value]
    everyone = [None] * world_size() if rank() == 0 else None
    dist.gather_object(value, everyone, dst=0)
    return everyone


def local_quantization(model, amax: bool) -> dict:
    """This rank's part of the model's quantization, by logical name (global layer and expert numbers):
    `quantizers`, every enabled quantizer's (role, format); with `amax`, `amax`, the largest value of each one's
    calibrated amax (None where it has none); `errors`, every quantized weight's squared quantization error and
    squared norm (fake-quantized against unquantized, in float64) over the shard this rank holds: sums, so that
    a sharded weight's are the sums of its shards'. One transfer to the host each."""
    from dist_quant.calibrate.pipeline import quant_modules
    from dist_quant.quantizer import TensorQuantizer

    quantizers, amax_of, error_of = {}, {}, {}
    with torch.no_grad():
        for _, module in quant_modules(model):
            logical = module.layout.logical_name
            for attr, q in module.named_children():
                if isinstance(q, TensorQuantizer) and q.enabled:
                    fmt = q.fmt.describe() + (" (constant amax)" if q.fmt.use_constant_amax else "")
                    quantizers[f"{logical}.{attr}"] = (attr.removesuffix("_quantizer"), fmt)
                    if amax and q._amax is not None:
                        amax_of[f"{logical}.{attr}"] = q._amax.float().max()
            for quantizer, weight in module.weight_quantizers():
                if quantizer.enabled:
                    difference = (quantizer(weight).double() - weight.double()).square().sum()
                    error_of[logical] = torch.stack([difference, weight.double().square().sum()])
    amax_values = torch.stack(list(amax_of.values())).tolist() if amax_of else []
    error_values = torch.stack(list(error_of.values())).tolist() if error_of else []
    return {
        "quantizers": quantizers,
        "amax": dict.fromkeys(quantizers) | dict(zip(amax_of, amax_values)) if amax else {},
        "errors": dict(zip(error_of, map(tuple, error_values))),
    }


def merged_quantization(states: list[dict]) -> dict:
    """Every rank's `local_quantization`, merged: each quantizer once (replicas and TP shards hold the same
    one), its amax the largest any rank holds, each weight's sums added over the ranks holding it (every shard of
    a weight has as many replicas, so replicas change no ratio of its sums)."""
    quantizers, amax, errors = {}, {}, {}
    for state in states:
        quantizers.update(state["quantizers"])
        for name, value in state["amax"].items():
            amax[name] = value if amax.get(name) is None else max(amax[name], value)
        for name, (error, norm) in state["errors"].items():
            total = errors.setdefault(name, [0.0, 0.0])
            total[0] += error
            total[1] += norm
    return {"quantizers": quantizers, "amax": amax, "errors": errors}


def weight_error_by_type(errors: dict[str, list[float]]) -> dict[str, float]:
    """Relative MSE ||fq(w) - w||^2 / ||w||^2 of the quantized weights of each module type, from the merged sums."""
    from dist_quant.report import MODULE_TYPES, module_type

    sums: dict[str, list[float]] = {}
    for name, (error, norm) in errors.items():
        total = sums.setdefault(module_type(name), [0.0, 0.0])
        total[0] += error
        total[1] += norm
    return {kind: sums[kind][0] / sums[kind][1] for kind in MODULE_TYPES if kind in sums and sums[kind][1] > 0}


def _exported_weights(model, bridge, groups, writers: str) -> set[str]:
    """The checkpoint names of the weights this rank writes (progress counts them): from the export's plan, which
    export_hf then reuses. Collective."""
    from dist_quant.bridge.io import export_plan

    parallel = writers == "all" and world_size() > 1
    plan = export_plan(model, bridge, groups, None if parallel else 0, quant_state=True)
    return {
        name for _, entries in plan.layers for planned in entries
        if planned.target == plan.rank and "_quantizer." not in planned.name for name in planned.hf_names
    }


def _export(model, bridge, target, groups, source, writers: str):
    """export_hf with progress (this rank's weights written) on rank 0; an error names --out, not the
    temporary directory it was written in."""
    from dist_quant.export import export_hf

    lead = rank() == 0
    weights = _exported_weights(model, bridge, groups, writers)
    share = " (rank 0's share)" if writers == "all" and world_size() > 1 else ""
    with Progress(f"exporting{share}", "weights", len(weights), lead) as progress:

        def written(name: str) -> None:
            if name in weights:
                progress.update()
                if progress.done == progress.total:
                    progress.close()
                    say("writing the last shards and verifying the checkpoint", lead)

        try:
            return export_hf(model, bridge, target, groups, source_dir=source, on_tensor=written, writers=writers)
        except user_errors() as error:
            raise named_for_user(error, target) from None


def named_for_user(error: Exception, target) -> Exception:
    """The error with the target's temporary directory (where the checkpoint is written until it is complete and
    verified) named as the user named --out, in the same words on every rank."""
    message = target.shown_in(str(error))
    return error if message == str(error) else type(error)(message)


def layout_text(args: argparse.Namespace) -> str:
    world = world_size()
    pp = f" x PP {args.pp}" if args.pp > 1 else ""
    return f"TP {args.tp} x EP {args.ep}{pp} on {world} rank{'s' if world != 1 else ''}"


def run(args: argparse.Namespace) -> Path | None:
    """The whole job on this rank (after `validate`). -> the checkpoint directory on rank 0. Steps that hold no
    collective end in an agreement over the world, so an error on any rank stops every rank with it; a rank that
    stops answering (stopped, hung, gone) is named by the others once a collective has waited --timeout minutes
    for it and the roll call that follows as long."""
    from dist_quant.parallel.agree import is_collective_failure, stalls_named

    # megatron-core warns about every optional accelerator it lacks (Apex, Transformer Engine) on every rank.
    warnings.filterwarnings("ignore", module=r"megatron(\.|$)")
    started = time.perf_counter()
    timeout = datetime.timedelta(minutes=args.timeout)
    device = init_distributed(timeout)
    try:
        with stalls_named(timeout, user_errors()):
            out = _calibrate_and_export(args, device, timeout, started)
    except Exception as error:
        # ended, unless a collective failed (a rank may be stopped, and NCCL would wait for it): NCCL warns of a
        # group left at exit
        if not is_collective_failure(error.__cause__ or error):
            dist.destroy_process_group()
        raise
    dist.destroy_process_group()
    return out


def _calibrate_and_export(args: argparse.Namespace, device: torch.device, timeout: datetime.timedelta, started: float) -> Path | None:
    """`run`'s work, in the process group it made: build, read, calibrate, export, summary."""
    from dist_quant.bridge import ModelBridge
    from dist_quant.bridge.fp8_source import source_note
    from dist_quant.bridge.io import load_hf_weights, source_reader
    from dist_quant.calibrate import attach_quantizers, calibrate
    from dist_quant.calibrate.pipeline import amax_reducer, logits_discarded
    from dist_quant.export import estimated_bytes
    from dist_quant.parallel import megatron_compat
    from dist_quant.parallel.agree import raised_together
    from dist_quant.parallel.groups import ParallelGroups
    from dist_quant.parallel.schedule import forward_only
    from dist_quant.recipe import load_recipe

    timer = Timer(device)
    lead = rank() == 0
    target = output_target(args)
    try:
        with timer.stage("setup"):
            megatron_compat.initialize(args.tp, args.ep, args.etp, timeout, args.pp)
            groups = ParallelGroups.from_megatron(timeout)
            # the checkpoint: the weights (unless drawn at random), the tokenizer, the dtypes of unquantized tensors
            checkpoint = Path(args.hf_model) if args.hf_model else None
            if checkpoint is None and not args.random_weights:
                checkpoint = builtin_checkpoint(args.model, args.seed)
                target.protected.append(checkpoint.resolve())
            with raised_together(user_errors()):
                bridge = model_bridge(args) if checkpoint is None else ModelBridge.from_hf(checkpoint, seq_len=args.seq_len)
                megatron_compat.seed(args.seed)
                dtype = getattr(torch, args.dtype)
                say(f"building the model: {bridge.config.require('num_hidden_layers')} layers, {layout_text(args)}", lead)
                building = time.perf_counter()
                model = bridge.build(args.tp, args.ep, args.etp, dtype, pipeline_split(args), device).to(device).eval()
                say(f"built in {duration(time.perf_counter() - building)}", lead)
                left_out, read_note = [], None
                if not args.random_weights:
                    read_note = source_note(bridge.config.fp8_block, bridge.dtype, bridge.config.fp8_kv_cache)
                    if read_note:
                        say(read_note, lead)
                    with Progress("reading weights", "tensors", enabled=lead) as progress:
                        left_out = load_hf_weights(model, bridge, source_reader(checkpoint, bridge), groups, progress.at)
                batches = calibration_batches(args.calibration.samples, args.batch_size, groups.rank("dp"), groups.size("dp"))
                recipe = load_recipe(args.recipe)
                attach_quantizers(model, recipe, groups)
            needed = estimated_bytes(model, bridge, groups)
            with raised_together(user_errors()):
                if lead:  # before any calibration: the output can be written, has room, and is ours alone
                    target.claim(needed)

        def forward_loop(m):
            # statistics only: the logits would take more memory than anything else
            with Progress("calibrating", "batches", len(batches), lead) as progress, logits_discarded(m):
                forward_only(m, batches, device, on_batch=progress.update, keep_logits=False)

        with timer.stage("calibrate"):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                calibrate(model, recipe, forward_loop, groups)
        bootstrapped = sum(int(str(w.message).split()[0]) for w in caught if "bootstrapped" in str(w.message))
        collectives = amax_reducer(model).collectives
        with timer.stage("export"):
            out = _export(model, bridge, target, groups, checkpoint, args.export_writers)
    finally:
        target.release()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    local = local_quantization(model, amax=args.report is not None)
    states = _on_lead({**local, "bootstrapped": bootstrapped, "peaks": (timer.peaks, weights) if timer.gpu else None})
    if lead:
        quantization = merged_quantization(states)
        report_lines = []
        if args.report is not None:
            from dist_quant import report

            built = report.build(quantization, bridge.registry(quant_state=True), {
                "model": args.model or args.hf_model, "recipe": args.recipe, "layout": layout_text(args),
                "dtype": args.dtype, "calibration data": args.calibration.describe(), "checkpoint": str(out),
            })
            report_lines = report.write(args.report, built)
        summary = Summary(
            args, out, quantization, sum(s["bootstrapped"] for s in states), collectives, timer,
            time.perf_counter() - started, left_out, [s["peaks"] for s in states], report_lines, read_note,
        )
        print(summary.text(), flush=True)
    return out


def _memory_lines(peaks: list) -> list[str]:
    """Per rank: the peak GPU memory of each stage, in GiB and as a multiple of the rank's weights."""
    if peaks[0] is None:
        return []
    lines = ["  peak GPU memory per rank (GiB; x its weights):"]
    for r, (stages, weights) in enumerate(peaks):
        worst = max(stages.values())
        per_stage = ", ".join(f"{name} {peak / 2**30:.1f}" for name, peak in stages.items())
        lines.append(f"    rank {r}: {worst / 2**30:.1f} ({worst / weights:.2f}x of {weights / 2**30:.1f}): {per_stage}")
    return lines


@dataclass
class Summary:
    """What the job did, for a person: printed by rank 0 at the end."""

    args: argparse.Namespace
    out: Path
    quantization: dict  # merged_quantization
    bootstrapped: int
    collectives: int
    timer: Timer
    total: float  # seconds
    left_out: list[str]
    peaks: list  # per rank: (peak bytes per stage, bytes of weights), or None without a GPU
    report_lines: list[str]
    read_note: str | None  # what reading the source did to its weights (fp8_source.source_note)

    def text(self) -> str:
        args, timer, calibration = self.args, self.timer, self.args.calibration
        kinds: dict[str, int] = {}
        for role, fmt in self.quantization["quantizers"].values():
            kinds[f"{role} {fmt}"] = kinds.get(f"{role} {fmt}", 0) + 1
        errors = weight_error_by_type(self.quantization["errors"])
        written = sum(f.stat().st_size for f in Path(self.out).glob("*.safetensors"))
        lines = [
            "",
            f"dist-quant calibrate: {args.model or args.hf_model}, recipe {args.recipe}, {layout_text(args)}, {args.dtype}",
            *([f"  {self.read_note}"] if self.read_note else []),
            f"  calibration data: {calibration.describe()}",
            "  quantizers in the model by kind and format (every rank's, each counted once):",
            *[f"    {count:6d}  {kind}" for kind, count in sorted(kinds.items())],
            f"  experts' activation quantizers bootstrapped (no calibration tokens): {self.bootstrapped}",
            *([f"  left out: {len(self.left_out)} tensors of multi-token-prediction layers (outside the forward, not "
               "calibrated; the export announces none)"] if self.left_out else []),
            f"  amax all-reduces issued by the calibration syncs on rank 0: {self.collectives}",
            "  weight quantization error (relative MSE) by layer type:",
            *[f"    {kind:14s} {value:.3e}" for kind, value in errors.items()],
            "  time per stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in timer.stages.items()) + f"; total {self.total:.1f} s",
            f"  calibration: {calibration.tokens:,} tokens, {calibration.tokens / timer.stages['calibrate']:,.0f} tokens/s",
            *_memory_lines(self.peaks),
            f"  checkpoint: {self.out}, {written / 1e9:.2f} GB, exported at {written / 1e9 / timer.stages['export']:.2f} GB/s"
            f"  (check it with: dist-quant inspect {self.out})",
            *[f"  {line}" for line in self.report_lines],
        ]
        return "\n".join(lines)
