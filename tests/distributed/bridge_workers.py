"""Checkpoints and per-rank work for the bridge tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from dist_quant.bridge import BridgeError, ModelBridge
from dist_quant.bridge.io import SafetensorsReader, export_hf_stream, load_hf_weights
from dist_quant.parallel import megatron_compat
from dist_quant.parallel.groups import ParallelGroups
from dist_quant.parallel.schedule import forward_only
from tests.distributed.workers import device

ARCHS = ("llama", "qwen3", "qwen3_moe", "mixtral", "glm4_moe", "deepseek_v3")
SEQ = 8


def hf_config(arch: str):
    import transformers

    common = dict(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, max_position_embeddings=64, tie_word_embeddings=False, attn_implementation="eager",
    )
    if arch == "llama":
        return transformers.LlamaConfig(intermediate_size=128, **common), transformers.LlamaForCausalLM
    if arch == "qwen3":
        return transformers.Qwen3Config(intermediate_size=128, **common), transformers.Qwen3ForCausalLM
    if arch == "mixtral":
        return transformers.MixtralConfig(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, **common), transformers.MixtralForCausalLM
    if arch == "deepseek_v3":  # multi-latent attention (every head its own key and value: kv heads = heads)
        config = transformers.DeepseekV3Config(
            intermediate_size=128, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
            topk_group=1, first_k_dense_replace=1, n_shared_experts=1, q_lora_rank=32, kv_lora_rank=32,
            qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, **(common | {"num_key_value_heads": 4})
        )
        return config, transformers.DeepseekV3ForCausalLM
    if arch == "glm4_moe":
        config = transformers.Glm4MoeConfig(
            intermediate_size=128, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
            topk_group=1, first_k_dense_replace=1, n_shared_experts=1, use_qk_norm=True, attention_bias=True, **common
        )
        return config, transformers.Glm4MoeForCausalLM
    config = transformers.Qwen3MoeConfig(
        intermediate_size=128, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, **common
    )
    return config, transformers.Qwen3MoeForCausalLM


def probe_tokens() -> torch.Tensor:
    return torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(3))


def write_checkpoints(root: Path, archs: tuple[str, ...] = ARCHS) -> dict:
    from safetensors.torch import load_file

    out = {}
    for i, arch in enumerate(ARCHS):
        if arch not in archs:
            continue
        config, cls = hf_config(arch)
        torch.manual_seed(100 + i)
        model = cls(config).eval()
        path = root / arch
        model.save_pretrained(path)
        with torch.no_grad():
            logits = model(probe_tokens()).logits
        out[arch] = (path, load_file(path / "model.safetensors"), logits)
    return out


def pipeline_logits(model, groups: ParallelGroups, batches: list[torch.Tensor]) -> torch.Tensor:
    """Full-vocabulary logits of the batches through megatron's schedule (any pipeline split), on every rank."""
    local = forward_only(model, batches, device())
    if local and groups.tp is not None:  # vocab-sharded over TP
        local = [torch.cat(_gathered(piece, groups.tp), -1) for piece in local]
    mine = torch.cat(local).cpu() if local and groups.rank("tp") == 0 else None
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return next(t for t in everyone if t is not None)


def _gathered(piece: torch.Tensor, group) -> list[torch.Tensor]:
    pieces = [torch.empty_like(piece) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, piece.contiguous(), group=group)
    return pieces


def _logits(model, groups: ParallelGroups) -> torch.Tensor:
    return pipeline_logits(model, groups, [probe_tokens()])


def load_checkpoint(path: str, tp: int, ep: int, groups: ParallelGroups, seq_len: int | None = None, pp: int = 1):
    """The checkpoint's model loaded through the bridge, in megatron's (initialized) layout; with pipeline
    stages, layers that do not split evenly put the remainder on the first stage."""
    from dist_quant.bridge.models import PipelineSplit

    bridge = ModelBridge.from_hf(path, seq_len=seq_len)
    layers = bridge.config.require("num_hidden_layers")
    pipeline = PipelineSplit(pp, first=layers % pp + layers // pp if layers % pp else None)
    megatron_compat.seed(0)  # random init, overwritten by the checkpoint
    model = bridge.build(tp, ep, pipeline=pipeline).to(device()).eval()
    load_hf_weights(model, bridge, SafetensorsReader(path), groups)
    return bridge, model


def loaded_model(path: str, tp: int, ep: int, pp: int = 1):
    """megatron's parallel state for the layout, and the checkpoint's model loaded through the bridge."""
    megatron_compat.initialize(tp, ep, pp=pp)
    groups = ParallelGroups.from_megatron()
    return (groups, *load_checkpoint(path, tp, ep, groups, pp=pp))


def round_trip(paths: dict[str, str], tp: int, ep: int) -> dict:
    """Per architecture: load the checkpoint into a sharded model, stream it back to rank 0, and run it."""
    megatron_compat.initialize(tp, ep)
    groups = ParallelGroups.from_megatron()
    report = {}
    for arch, path in paths.items():
        bridge, model = load_checkpoint(path, tp, ep, groups)
        report[arch] = {"tensors": dict(export_hf_stream(model, bridge, groups)), "logits": _logits(model, groups)}
    return report


def load_errors(path: str, scratch: str) -> dict:
    """Broken copies of a checkpoint: what load_hf_weights (and the reader) say about each."""
    import json

    from safetensors.torch import load_file, save_file

    megatron_compat.initialize(1, 1)
    groups = ParallelGroups.from_megatron()
    bridge = ModelBridge.from_hf(path)
    tensors = load_file(Path(path) / "model.safetensors")
    norm = "model.layers.0.input_layernorm.weight"
    cases = {
        "extra": {**tensors, "model.layers.0.mlp.extra.weight": torch.zeros(2)},
        "shape": {**tensors, "model.layers.1.self_attn.o_proj.weight": torch.zeros(64, 32)},
        "missing": {k: v for k, v in tensors.items() if k != "model.norm.weight"},
        "int32": {**tensors, norm: tensors[norm].to(torch.int32)},
        "outside-index": tensors,
        "garbage-file": tensors,
    }
    messages = {}
    for case, broken in cases.items():
        directory = Path(scratch) / case
        shutil.copytree(path, directory)
        save_file(broken, directory / "model.safetensors")
        if case == "outside-index":
            index = {"weight_map": {name: "../outside.safetensors" for name in broken}}
            (directory / "model.safetensors.index.json").write_text(json.dumps(index))
        if case == "garbage-file":
            (directory / "model.safetensors").write_bytes(b"\x13garbage, not a safetensors header" * 10)
        try:
            load_hf_weights(bridge.build(), bridge, SafetensorsReader(directory), groups)
        except BridgeError as error:
            messages[case] = str(error)
    return messages


def calibrate_and_export(
    path: str, out: str, tp: int, ep: int, recipe: str, fail_after: int | None = None, pp: int = 1,
    writers: str = "one", group_elements: int | None = None,
) -> dict:
    """Calibrate the checkpoint's model at a layout and export it. -> weight-only fake-quant logits (every rank)
    and the all-reduces of one amax sync. fail_after: raise from the progress callback after that many tensors
    (an interrupted export). group_elements: the exporter's quantization groups this small."""
    from dist_quant import quantize
    from dist_quant.calibrate.pipeline import amax_reducer
    from dist_quant.export import checkpoint, export_hf
    from dist_quant.quantizer import QuantizerMode, TensorQuantizer

    if group_elements is not None:
        checkpoint.GROUP_ELEMENTS = group_elements

    groups, bridge, model = loaded_model(path, tp, ep, pp)
    gen = torch.Generator().manual_seed(11)
    data = [torch.randint(0, 128, (4, SEQ), generator=gen) for _ in range(3)]
    quantize(model, recipe, lambda m: forward_only(m, data, device()))
    reducer = amax_reducer(model)
    before = reducer.collectives
    reducer.sync()
    sync = {"collectives": reducer.collectives - before, "domains": sum(a.group is not None for a in reducer.arenas.values())}
    written = []

    def progress(name):
        written.append(name)
        if fail_after is not None and len(written) >= fail_after:
            raise RuntimeError("simulated failure in the middle of the export")

    try:
        export_hf(model, bridge, out, groups, source_dir=path, max_shard_bytes=64 << 10, on_tensor=progress, writers=writers)
    except RuntimeError as error:
        return {"error": str(error), "written": len(written)}
    activations = [q for n, q in model.named_modules() if isinstance(q, TensorQuantizer) and q.enabled and not n.endswith("weight_quantizer")]
    for q in activations:
        q.mode = QuantizerMode.DISABLED
    return {"weight_only_logits": _logits(model, groups), "written": len(written), "sync": sync}


def weight_only_recipe(scope: tuple[str, ...] = ("*",)) -> dict:
    """Static NVFP4 weights with MSE block scales in `scope` (fnmatch patterns), nothing else."""
    static = {"num_bits": "e2m1", "block_sizes": {-1: 16, "type": "static"}}
    return {"quantize": {"algorithm": {"method": "mse", "fp8_scale_sweep": True}, "quant_cfg": [
        {"quantizer_name": "*", "enable": False},
        *({"quantizer_name": f"{s}weight_quantizer", "cfg": static} for s in scope),
        {"quantizer_name": "*output_layer*", "enable": False},
        {"quantizer_name": "*lm_head*", "enable": False},
    ]}}


def refit_run(path: str, tp: int, ep: int, recipe: dict, state_dir: str, pp: int = 1) -> dict:
    """Calibrate with `recipe` (activations on a few random batches), stream a refit; take a training step,
    recalibrate the weights, stream again. Also saves the quantizer state of the first calibration."""
    from dist_quant import quantize
    from dist_quant.calibrate import recalibrate_weights
    from dist_quant.calibrate.state import save_quant_state
    from dist_quant.refit import refit_stream

    groups, bridge, model = loaded_model(path, tp, ep, pp)
    gen = torch.Generator().manual_seed(11)
    data = [torch.randint(0, 128, (4, SEQ), generator=gen) for _ in range(2)]
    quantize(model, recipe, lambda m: forward_only(m, data, device()))
    save_quant_state(model, state_dir, groups)
    report = {"logits": _logits(model, groups), "stream": list(refit_stream(model, bridge, groups))}
    report["quantized_names"] = [name for name, _ in refit_stream(model, bridge, groups, quantized=True)]
    gen = torch.Generator().manual_seed(5)  # the same on every rank: replicated weights stay replicated
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * param.abs().mean() * torch.randn(param.shape, generator=gen))
    recalibrate_weights(model)
    report["stepped_logits"] = _logits(model, groups)
    report["stepped_stream"] = list(refit_stream(model, bridge, groups))
    return report


def restore_run(path: str, tp: int, ep: int, recipe: dict, state_dir: str, pp: int = 1) -> torch.Tensor:
    """A fresh model at another layout, quantizers attached, state restored from `state_dir`. -> logits."""
    from dist_quant import load_recipe
    from dist_quant.calibrate import attach_quantizers
    from dist_quant.calibrate.state import restore_quant_state

    groups, bridge, model = loaded_model(path, tp, ep, pp)
    attach_quantizers(model, load_recipe(recipe), groups)
    restore_quant_state(model, state_dir, groups)
    return _logits(model, groups)


def restore_error(path: str, tp: int, ep: int, recipe: dict, state_dir: str) -> str:
    """restore_run where it must fail: -> the QuantStateError's message."""
    from dist_quant.calibrate.state import QuantStateError

    try:
        restore_run(path, tp, ep, recipe, state_dir)
    except QuantStateError as error:
        return str(error)
    return "restored"


def pipeline_nan_case(path: str) -> str:
    """PP2: NaN in the attention of the last stage only. -> the error every rank raises."""
    from megatron.core import parallel_state

    from dist_quant import quantize
    from dist_quant.calibrate import CalibrationError

    groups, bridge, model = loaded_model(path, 1, 1, 2)
    if parallel_state.is_pipeline_last_stage():
        qkv = model.decoder.layers[-1].self_attention.linear_qkv
        qkv.register_forward_hook(lambda mod, inp, out: (out[0] * float("nan"), out[1]))
    try:
        quantize(model, "fp8_default-fp8_cast_kv", lambda m: forward_only(m, [probe_tokens()], device()))
    except CalibrationError as error:
        return str(error)
    return "no error"


def w4a4_mse_recipe() -> dict:
    """NVFP4 weights with static MSE block scales and NVFP4 inputs (a head tied or not, left alone), FP8 K/V."""
    nvfp4 = {"num_bits": "e2m1", "block_sizes": {-1: 16, "type": "dynamic"}}
    return {"quantize": {"algorithm": {"method": "mse", "fp8_scale_sweep": True}, "quant_cfg": [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*weight_quantizer", "cfg": {**nvfp4, "block_sizes": {-1: 16, "type": "static"}}},
        {"quantizer_name": "*input_quantizer", "cfg": nvfp4},
        {"quantizer_name": "*[kv]_bmm_quantizer", "cfg": {"num_bits": "e4m3"}},
        {"quantizer_name": "*output_layer*", "enable": False},
    ]}}


def w4a4_recipe() -> dict:
    """NVFP4 weights (static MSE block scales) and inputs everywhere but the output layer, no KV cache (which
    transformers' attention cannot quantize)."""
    recipe = w4a4_mse_recipe()
    quant_cfg = [e for e in recipe["quantize"]["quant_cfg"] if e["quantizer_name"] != "*[kv]_bmm_quantizer"]
    return {"quantize": {**recipe["quantize"], "quant_cfg": [*quant_cfg, {"quantizer_name": "*lm_head*", "enable": False}]}}


def refit_forms(path: str, tp: int, ep: int, pp: int, recipe) -> dict:
    """Calibrate at a layout, then every form of the refit, plain and quantized: the stream gathered to rank 0,
    and the buckets of every rank's own share (tiny buckets, so that layers span several). -> per rank, on the
    CPU: {quantized: {"stream": [(name, tensor)] on rank 0, "buckets": [{name: tensor}], "bucket_bytes": [...]}}."""
    from dist_quant import quantize
    from dist_quant.refit import refit_buckets, refit_stream

    groups, bridge, model = loaded_model(path, tp, ep, pp)
    gen = torch.Generator().manual_seed(11)
    data = [torch.randint(0, 128, (4, SEQ), generator=gen) for _ in range(2)]
    quantize(model, recipe, lambda m: forward_only(m, data, device()))
    out = {}
    for quantized in (False, True):
        stream = [(name, tensor.cpu().clone()) for name, tensor in refit_stream(model, bridge, groups, quantized=quantized)]
        buckets = list(refit_buckets(model, bridge, groups, bucket_bytes=4096, quantized=quantized))
        out[quantized] = {
            "stream": stream,
            "buckets": [{name: tensor.cpu().clone() for name, tensor in bucket.tensors()} for bucket in buckets],
            "bucket_bytes": [bucket.buffer.numel() for bucket in buckets],
        }
    return out


def expert_input_scales(path: str, ep: int) -> dict:
    """The checkpoint's model at EP `ep`, calibrated with the built-in NVFP4 recipe twice: experts' input amax per
    expert, and shared per layer and linear. -> {expert_inputs: {HF name: input_scale}} on rank 0."""
    import dataclasses

    from dist_quant import load_recipe, quantize
    from dist_quant.refit import refit_stream

    recipe = load_recipe("nvfp4_default-fp8_kv")
    data = [torch.randint(0, 128, (4, SEQ), generator=torch.Generator().manual_seed(11))]
    megatron_compat.initialize(1, ep)
    groups = ParallelGroups.from_megatron()
    out = {}
    for expert_inputs in ("per_expert", "shared"):
        bridge, model = load_checkpoint(path, 1, ep, groups)
        algorithm = dataclasses.replace(recipe.algorithm, expert_inputs=expert_inputs)
        quantize(model, dataclasses.replace(recipe, algorithm=algorithm), lambda m: forward_only(m, data, device()), groups)
        out[expert_inputs] = {
            name: tensor.item() for name, tensor in refit_stream(model, bridge, groups, quantized=True)
            if ".experts." in name and name.endswith(".input_scale")
        }
    return out
