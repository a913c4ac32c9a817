"""The calibrate job behind `dist-quant calibrate`: model from an HF checkpoint or a built-in tiny config,
calibration text, TP/EP-sharded calibration, export, and a summary a person can read. Run on every rank."""

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
from importlib import resources
from pathlib import Path

import torch
import torch.distributed as dist

from dist_quant.parallel.megatron_compat import layout_problem

# The built-in models' config.json files, package data (they ship in the wheel)
CONFIGS = Path(__file__).resolve().parent / "data" / "models"
# Built-in configs up to this many parameters get their random weights written once as a checkpoint (the same
# weights for every layout); larger ones need --random-weights.
BUILTIN_CHECKPOINT_LIMIT = 4_000_000_000
_LAYER_TYPES = (
    (r"\.linear_qkv$", "attention qkv"),
    (r"\.linear_proj$", "attention out"),
    (r"\.experts\..*\.linear_fc1$", "experts fc1"),
    (r"\.experts\..*\.linear_fc2$", "experts fc2"),
    (r"\.linear_fc1$", "mlp fc1"),
    (r"\.linear_fc2$", "mlp fc2"),
)


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
    reads the calibration texts into `args.texts`."""
    from dist_quant.export import check_exportable
    from dist_quant.export.side_files import check_side_files
    from dist_quant.recipe import load_recipe

    world = world_size()
    for name in ("tp", "ep", "etp", "pp", "pp_first_layers", "pp_last_layers", "calib_samples", "seq_len", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise JobError(f"--{name.replace('_', '-')} must be at least 1")
    if not args.timeout > 0:
        raise JobError("--timeout must be a positive number of minutes")
    problem = layout_problem(world, args.tp, args.ep, args.etp, args.pp)
    if problem:
        raise JobError(f"{problem}; run torchrun with a matching --nproc-per-node, e.g. {args.tp * args.ep * args.pp}")
    if args.hf_model is not None and not (Path(args.hf_model) / "config.json").is_file():
        raise JobError(f"--hf-model {args.hf_model}: no config.json there")
    if args.hf_model is not None:
        check_side_files(args.hf_model)  # that the export will copy: refused now, not after the calibration
    if args.model is not None and args.model not in builtin_models():
        raise JobError(f"--model {args.model}: unknown; built-in models: {', '.join(builtin_models()) or 'none found'}")
    if args.calib_data is not None and not Path(args.calib_data).is_file():
        raise JobError(f"--calib-data {args.calib_data}: no such file")
    problem = output_target(args).problem()
    if problem:
        raise JobError(f"--out {problem}")
    recipe = load_recipe(args.recipe)
    bridge = model_bridge(args)
    bridge.check_layout(args.tp, args.ep, pipeline_split(args))
    check_exportable(recipe, bridge)  # a recipe the checkpoint cannot hold fails here, not after calibration
    args.dtype = args.dtype or _dtype_name(bridge.dtype)
    if args.model is not None and not args.random_weights:
        params = sum(shape.numel() for shape in bridge.hf_tensor_shapes().values())
        if params > BUILTIN_CHECKPOINT_LIMIT:
            raise JobError(
                f"--model {args.model}: {params / 1e9:.1f}B parameters, too many to write as a random checkpoint "
                f"first ({params * bridge.dtype.itemsize / 1e9:.0f} GB from one CPU); add --random-weights to draw "
                "them on each rank's device"
            )
    args.texts = _texts(args.calib_data)


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
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
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


def _texts(path: str | None) -> list[str]:
    """The calibration texts: a text file whole, or the `text` field of each line of a .jsonl file."""
    if path is None:
        return [resources.files("dist_quant.data").joinpath("calibration.txt").read_text()]
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise JobError(f"--calib-data {path}: not UTF-8 text (byte {error.start}): give a text or .jsonl file") from None
    if not path.endswith(".jsonl"):
        return [text]
    texts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise JobError(f"--calib-data {path}: line {number} is not JSON ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise JobError(f"--calib-data {path}: line {number} needs a string 'text' field")
        texts.append(record["text"])
    return texts


def replica_samples(count: int, replica: int, replicas: int, batch: int = 1) -> list[int]:
    """Indices of the samples one data-parallel replica calibrates on: its strided share, wrapped around so that
    every replica gets the same number, ceil(count / replicas) rounded up to whole batches. Every replica then
    runs as many forward steps of one shape (MoE token exchanges span replicas, and pipeline stages pass
    microbatches of one shape: a step more or a shape apart would wait forever), and a repeated sample changes
    no maximum."""
    share = -(-count // replicas)
    return [(replica + k * replicas) % count for k in range(-(-share // batch) * batch)]


def calibration_batches(args, checkpoint: Path | None, vocab_size: int, dp_rank: int, dp_size: int) -> list[torch.Tensor]:
    """Token batches of this data-parallel rank's share, as many and of one shape [batch, seq_len] on every rank
    (batch: --batch-size, or the share if smaller): the checkpoint's tokenizer if it has one, else bytes (the
    built-in models' vocabularies hold every byte)."""
    texts = args.texts
    if checkpoint is not None and (checkpoint / "tokenizer_config.json").is_file():
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
        stream = [t for text in texts for t in tokenizer(text)["input_ids"]]
    else:
        stream = [b % vocab_size for text in texts for b in text.encode()]
    need = args.calib_samples * args.seq_len
    if not stream:
        raise JobError("the calibration data is empty")
    stream = (stream * (need // len(stream) + 1))[:need]
    samples = torch.tensor(stream).reshape(args.calib_samples, args.seq_len)
    batch = min(args.batch_size, -(-args.calib_samples // dp_size))
    return list(samples[replica_samples(args.calib_samples, dp_rank, dp_size, batch)].split(batch))


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


def _sum_over_ranks(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Summed over every rank (on the collective backend's device: NCCL needs CUDA tensors)."""
    values = values.to(device)
    dist.all_reduce(values)
    return values.cpu()


def weight_error_by_type(model, device: torch.device) -> dict[str, float]:
    """Relative MSE ||fq(w) - w||^2 / ||w||^2 of every quantized weight, per layer type, over all ranks."""
    from dist_quant.calibrate.pipeline import quant_modules

    types = [t for _, t in _LAYER_TYPES]
    sums = torch.zeros(2, len(types), dtype=torch.float64)
    with torch.no_grad():
        for _, module in quant_modules(model):
            for quantizer, weight in module.weight_quantizers():
                if quantizer.enabled:
                    kind = next((t for p, t in _LAYER_TYPES if re.search(p, module.layout.logical_name)), None)
                    if kind is not None:
                        error = (quantizer(weight).double() - weight.double()).square().sum()
                        sums[:, types.index(kind)] += torch.stack([error, weight.double().square().sum()]).cpu()
    sums = _sum_over_ranks(sums, device)  # every replica adds the whole model: the ratio is unchanged
    return {t: (sums[0, i] / sums[1, i]).item() for i, t in enumerate(types) if sums[1, i] > 0}


def run(args: argparse.Namespace) -> Path | None:
    """The whole job on this rank (after `validate`). -> the checkpoint directory on rank 0. Steps that hold no
    collective end in an agreement over the world, so an error on any rank stops every rank with it."""
    from tqdm import tqdm

    from dist_quant.bridge import ModelBridge
    from dist_quant.bridge.io import SafetensorsReader, load_hf_weights
    from dist_quant.calibrate import attach_quantizers, calibrate
    from dist_quant.calibrate.pipeline import amax_reducer, logits_discarded
    from dist_quant.export import estimated_bytes, export_hf
    from dist_quant.parallel import megatron_compat
    from dist_quant.parallel.agree import every_rank, raised_together
    from dist_quant.parallel.groups import ParallelGroups
    from dist_quant.parallel.schedule import forward_only
    from dist_quant.quantizer import TensorQuantizer
    from dist_quant.recipe import load_recipe

    # megatron-core warns about every optional accelerator it lacks (Apex, Transformer Engine) on every rank.
    warnings.filterwarnings("ignore", module=r"megatron(\.|$)")
    started = time.perf_counter()
    timeout = datetime.timedelta(minutes=args.timeout)
    device = init_distributed(timeout)
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
                model = bridge.build(args.tp, args.ep, args.etp, dtype, pipeline_split(args), device).to(device).eval()
                left_out = [] if args.random_weights else load_hf_weights(model, bridge, SafetensorsReader(checkpoint), groups)
                vocab = bridge.hf_config["vocab_size"]
                batches = calibration_batches(args, checkpoint, vocab, groups.rank("dp"), groups.size("dp"))
                recipe = load_recipe(args.recipe)
                attach_quantizers(model, recipe, groups)
            needed = estimated_bytes(model, bridge, groups)
            with raised_together(user_errors()):
                if lead:  # before any calibration: the output can be written, has room, and is ours alone
                    target.claim(needed)

        def forward_loop(m):
            progress = tqdm(total=len(batches), desc="calibrating", unit="batch", disable=not lead)
            with logits_discarded(m):  # statistics only: the logits would take more memory than anything else
                forward_only(m, batches, device, on_batch=progress.update, keep_logits=False)
            progress.close()

        with timer.stage("calibrate"):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                calibrate(model, recipe, forward_loop, groups)
        local = sum(int(str(w.message).split()[0]) for w in caught if "bootstrapped" in str(w.message))
        bootstrapped = int(_sum_over_ranks(torch.tensor([float(local)]), device).item())
        collectives = amax_reducer(model).collectives
        with timer.stage("export"):
            progress = tqdm(desc="exporting", unit="tensor", disable=not lead)
            out = export_hf(
                model, bridge, target, groups, source_dir=checkpoint, on_tensor=lambda _: progress.update(),
                writers=args.export_writers,
            )
            progress.close()
    finally:
        target.release()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    peaks = every_rank((timer.peaks, weights) if timer.gpu else None)
    errors = weight_error_by_type(model, device)
    kinds: dict[str, int] = {}
    for name, q in model.named_modules():
        if isinstance(q, TensorQuantizer) and q.enabled:
            role = name.rsplit(".", 1)[-1].replace("_quantizer", "")
            key = f"{role} {q.fmt.describe()}" + (" (constant amax)" if q.fmt.use_constant_amax else "")
            kinds[key] = kinds.get(key, 0) + 1
    if lead:
        _print_summary(args, out, kinds, bootstrapped, collectives, timer, errors, time.perf_counter() - started, left_out, peaks)
    dist.destroy_process_group()
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


def _print_summary(args, out, kinds, bootstrapped, collectives, timer, errors, total, left_out, peaks) -> None:
    tokens = args.calib_samples * args.seq_len
    written = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    lines = [
        "",
        f"dist-quant calibrate: {args.model or args.hf_model}, recipe {args.recipe}, TP {args.tp} x EP {args.ep}"
        + (f" x PP {args.pp}" if args.pp > 1 else "") + f" on {world_size()} ranks, {args.dtype}",
        "  quantizers on rank 0 by kind and format:",
        *[f"    {count:6d}  {kind}" for kind, count in sorted(kinds.items())],
        f"  experts' activation quantizers bootstrapped (no calibration tokens): {bootstrapped}",
        *([f"  left out: {len(left_out)} tensors of multi-token-prediction layers (outside the forward, not "
           "calibrated; the export announces none)"] if left_out else []),
        f"  amax all-reduces issued by the calibration syncs on rank 0: {collectives}",
        "  weight quantization error (relative MSE) by layer type:",
        *[f"    {kind:14s} {value:.3e}" for kind, value in errors.items()],
        "  time per stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in timer.stages.items()) + f"; total {total:.1f} s",
        f"  calibration: {tokens} tokens ({args.calib_samples} x {args.seq_len}), "
        f"{tokens / timer.stages['calibrate']:,.0f} tokens/s",
        *_memory_lines(peaks),
        f"  checkpoint: {out}, {written / 1e9:.2f} GB, exported at {written / 1e9 / timer.stages['export']:.2f} GB/s"
        f"  (check it with: dist-quant inspect {out})",
    ]
    print("\n".join(lines), flush=True)
