"""What each spawned rank runs: a tiny megatron-core GPT (dense or MoE, GQA, local spec) built at some TP/EP
layout from one set of full weights, calibrated with dist_quant, and reported in logical (unsharded) terms."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from dist_quant import quantize
from dist_quant.calibrate.pipeline import CalibrationError, amax_reducer
from dist_quant.calibrate.state import assemble, quantizer_buffers
from dist_quant.modules.megatron import logical_namer
from dist_quant.parallel import megatron_compat
from dist_quant.parallel.groups import ParallelGroups
from dist_quant.parallel.layout import shard
from dist_quant.quantizer import QuantizerMode, TensorQuantizer
from tests.reference.tolerance import transformer_roundings

# gloo on CPU here and in CI; DIST_QUANT_TEST_BACKEND=nccl runs the distributed tests on one GPU per rank, and
# DIST_QUANT_TEST_MAX_RANKS keeps the layouts that fit the GPUs there.
BACKEND = os.environ.get("DIST_QUANT_TEST_BACKEND", "gloo")
MAX_RANKS = int(os.environ.get("DIST_QUANT_TEST_MAX_RANKS", "0")) or None


def fitting(layouts: dict) -> dict:
    """The layouts (name -> (world size, ...)) whose world fits DIST_QUANT_TEST_MAX_RANKS."""
    return {name: layout for name, layout in layouts.items() if MAX_RANKS is None or layout[0] <= MAX_RANKS}


VOCAB, SEQ, BATCH, EXPERTS = 128, 16, 4, 4
# the roundings along build_model's forward (tests.reference.tolerance)
FORWARD_ROUNDINGS = transformer_roundings(
    {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 16, "intermediate_size": 128}, SEQ
)
DEAD_EXPERTS = (1, 3)

# Every amax granularity at once: per-channel FP8 attention weights, static-block NVFP4 MLP and expert weights
# (per-tensor amax, per-block amax from the MSE sweep), NVFP4 activations, calibrated FP8 K/V; and one shared
# global amax for all experts' fc1 weights of a layer, a group that spans the expert-parallel ranks.
EXPERTS_FC1 = r"(.*\.mlp\.experts)\.local_experts\.\d+\.linear_fc1\.weight_quantizer"
RECIPE = {
    "quantize": {
        "algorithm": {"method": "mse", "fp8_scale_sweep": True, "shared_patterns": {"weight": [EXPERTS_FC1]}},
        "quant_cfg": [
            {"quantizer_name": "*", "enable": False},
            {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": "e2m1", "block_sizes": {-1: 16}}},
            {"quantizer_name": "*self_attention*weight_quantizer", "cfg": {"num_bits": "e4m3", "axis": 0}},
            {"quantizer_name": "*mlp*weight_quantizer", "cfg": {"num_bits": "e2m1", "block_sizes": {-1: 16, "type": "static"}}},
            {"quantizer_name": "*[kv]_bmm_quantizer", "cfg": {"num_bits": "e4m3"}},
            {"quantizer_name": "*output_layer*", "enable": False},
        ]
    }
}


def device() -> torch.device:
    """The GPU of this rank under NCCL, else the CPU (gloo)."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def build_model(moe: bool, expert_bias: bool = False, num_layers: int = 2, experts: int = EXPERTS):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    megatron_compat.seed(1234)
    config = TransformerConfig(
        num_layers=num_layers, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
        kv_channels=16, gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
        qk_layernorm=True, normalization="LayerNorm", use_cpu_initialization=True, params_dtype=torch.float32,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size() if moe else 1,
        expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size() if moe else None,
        num_moe_experts=experts if moe else None, moe_router_topk=2, moe_ffn_hidden_size=64 if moe else None,
        moe_token_dispatcher_type="allgather", moe_aux_loss_coeff=0.0,
        moe_router_score_function="sigmoid" if expert_bias else "softmax", moe_router_enable_expert_bias=expert_bias,
    )
    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=False, qk_layernorm=True)
    model = GPTModel(config, spec, vocab_size=VOCAB, max_sequence_length=64, position_embedding_type="rope")
    model = model.to(device()).eval()
    if expert_bias:  # a router that never picks the dead experts
        for layer in model.decoder.layers:
            layer.mlp.router.expert_bias[list(DEAD_EXPERTS)] = -1e4
    return model


def batches(seed: int = 0, count: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen) for _ in range(count)]


def _forward(model, tokens):
    tokens = tokens.to(device())
    batch, seq = tokens.shape
    positions = torch.arange(seq, device=tokens.device)[None].expand(batch, seq)
    return model(tokens, positions, megatron_compat.causal_attention_mask(seq, tokens.device))


def _param_shard(param, groups: ParallelGroups):
    """(dim, stride, rank, size) of a megatron parameter from its own attributes; None if replicated."""
    if not getattr(param, "tensor_model_parallel", False):
        return None
    group = "tp" if getattr(param, "allreduce", True) else "etp"
    return param.partition_dim, param.partition_stride, groups.rank(group), groups.size(group)


def full_state(model) -> dict[str, torch.Tensor]:
    """Weights and buffers of an unsharded (TP1/EP1) model."""
    return {k: v.cpu().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def load_full_state(model, full: dict[str, torch.Tensor], groups: ParallelGroups) -> None:
    """Give a sharded model this rank's pieces of the full weights."""
    logical = logical_namer(model, groups.rank("ep"))
    params = dict(model.named_parameters())
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not isinstance(tensor, torch.Tensor):
            continue
        piece = full[logical(name)]
        layout = _param_shard(params[name], groups) if name in params else None
        if layout is not None:
            dim, stride, rank, size = layout
            piece = shard(piece, dim, rank, size, stride)
        with torch.no_grad():
            tensor.copy_(piece)


def logits(model, tokens, groups: ParallelGroups) -> torch.Tensor:
    """Full-vocabulary logits (megatron's are vocab-sharded over TP)."""
    with torch.no_grad():
        local = _forward(model, tokens)
    pieces = [torch.empty_like(local) for _ in range(groups.size("tp"))]
    if groups.tp is None:
        return local.cpu()
    dist.all_gather(pieces, local.contiguous(), group=groups.tp)
    return torch.cat(pieces, -1).cpu()


def logical_quant_state(model, groups: ParallelGroups) -> dict[str, torch.Tensor]:
    """Every amax buffer under its logical name, assembled from all ranks (replicas must agree bit for bit)."""
    local = [
        (key, getattr(q, buffer).cpu().clone(), split and split[:2], groups.rank(split[2]) if split else 0)
        for key, q, buffer, split in quantizer_buffers(model)
        if getattr(q, buffer) is not None
    ]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    return assemble(entry for rank_entries in everyone for entry in rank_entries)


def _calibrate_models(full: dict, groups: ParallelGroups, data: list[torch.Tensor]) -> dict:
    """Build the dense and the MoE model from the full weights, calibrate on `data`. -> per model: logical quant
    state, unquantized and quantized logits on held-out tokens."""
    report = {}
    eval_tokens = batches(seed=7, count=1)[0]
    for kind in ("dense", "moe"):
        model = build_model(moe=kind == "moe")
        load_full_state(model, full[kind], groups)
        plain = logits(model, eval_tokens, groups)
        quantize(model, RECIPE, lambda m: [_forward(m, t) for t in data])
        report[kind] = {
            "state": logical_quant_state(model, groups),
            "logits": plain,
            "quantized_logits": logits(model, eval_tokens, groups),
            "weight_quantized_logits": _weights_only(model, lambda: logits(model, eval_tokens, groups)),
        }
    return report


def _weights_only(model, run):
    """run() with activation and K/V quantizers off: weight fake quant alone is identical across layouts."""
    activations = [q for n, q in model.named_modules() if isinstance(q, TensorQuantizer) and q.enabled and not n.endswith("weight_quantizer")]
    for q in activations:
        q.mode = QuantizerMode.DISABLED
    try:
        return run()
    finally:
        for q in activations:
            q.mode = QuantizerMode.QUANTIZING


def reference(full_path: str) -> dict:
    """TP1/EP1 on one rank: writes the full weights every layout is built from, and calibrates on all data."""
    megatron_compat.initialize(1, 1)
    full = {kind: full_state(build_model(moe=kind == "moe")) for kind in ("dense", "moe")}
    torch.save(full, full_path)
    return _calibrate_models(full, ParallelGroups.from_megatron(), batches())


def run_layout(tp: int, ep: int, etp: int | None, full_path: str, data_split: bool = False, extra: bool = False) -> dict:
    """Calibrate at one layout. data_split: each data-parallel rank gets its own share of the batches."""
    megatron_compat.initialize(tp, ep, etp)
    groups = ParallelGroups.from_megatron()
    data = batches()
    if data_split:
        data = data[groups.rank("dp") :: groups.size("dp")]
    report = _calibrate_models(torch.load(full_path), groups, data)
    if extra:
        report["sync"] = sync_collectives(groups)
        report["dead_experts"] = dead_expert_report(groups)
    return report


def sync_collectives(groups: ParallelGroups) -> dict:
    """All-reduces issued by one amax sync, for models of different sizes."""
    counts = {}
    for layers in (1, 4):
        model = build_model(moe=True, num_layers=layers)
        quantize(model, RECIPE, lambda m: _forward(m, batches(count=1)[0]))
        reducer = amax_reducer(model)
        before = reducer.collectives
        reducer.sync()
        quantizer_count = sum(1 for m in model.modules() if isinstance(m, TensorQuantizer) and m.enabled)
        domains = sum(1 for arena in reducer.arenas.values() if arena.group is not None)
        counts[layers] = {"collectives": reducer.collectives - before, "quantizers": quantizer_count, "domains": domains}
    return counts


def dead_expert_report(groups: ParallelGroups) -> dict:
    """Calibrate an MoE whose router never picks DEAD_EXPERTS. -> logical state and the warnings raised."""
    import warnings

    model = build_model(moe=True, expert_bias=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize(model, RECIPE, lambda m: [_forward(m, t) for t in batches()])
    return {
        "state": logical_quant_state(model, groups),
        "warnings": [str(w.message) for w in caught if "bootstrapped" in str(w.message)],
    }


def error_cases() -> dict:
    """Bad input on two ranks: each must raise a clear error on every rank, never hang."""
    messages = {}
    try:
        megatron_compat.initialize(tp=2, ep=2)
    except ValueError as error:
        messages["world"] = str(error)
    megatron_compat.initialize(tp=2, ep=1)
    rank = dist.get_rank()
    model = build_model(moe=False)
    if rank == 1:  # bad activations on one rank only
        qkv = model.decoder.layers[1].self_attention.linear_qkv
        qkv.register_forward_hook(
            lambda mod, inp, out: (out[0].index_fill(-1, torch.tensor([3], device=out[0].device), float("nan")), out[1])
        )
    try:
        quantize(model, RECIPE, lambda m: [_forward(m, t) for t in batches()])
    except CalibrationError as error:
        messages["nan"] = str(error)
    from dist_quant.recipe import RecipeError

    nothing = {"quantize": {"quant_cfg": [{"quantizer_name": "*no_such_layer*", "cfg": {"num_bits": "e4m3"}}]}}
    try:
        quantize(build_model(moe=False), nothing, lambda m: None)
    except RecipeError as error:
        messages["recipe"] = str(error)
    return messages


def expert_nan_case() -> str:
    """EP2: NaN in the activations of an expert that only rank 1 holds. -> the error every rank raises."""
    megatron_compat.initialize(tp=1, ep=2)
    model = build_model(moe=True)
    if dist.get_rank() == 1:
        fc1 = model.decoder.layers[1].mlp.experts.local_experts[0].linear_fc1  # the last layer: NaN stays there
        fc1.register_forward_hook(lambda mod, inp, out: (out[0] * float("nan"), out[1]))
    try:
        quantize(model, RECIPE, lambda m: [_forward(m, t) for t in batches()])
    except CalibrationError as error:
        return str(error)
    return "no error"


def zero_expert_layer_case() -> str:
    """EP2: every expert of layer 1 has zero fc1 weights, so each fc2 input is all zeros. -> the error."""
    megatron_compat.initialize(tp=1, ep=2)
    model = build_model(moe=True)
    with torch.no_grad():
        for expert in model.decoder.layers[1].mlp.experts.local_experts:
            expert.linear_fc1.weight.zero_()
    try:
        quantize(model, RECIPE, lambda m: [_forward(m, t) for t in batches()])
    except CalibrationError as error:
        return str(error)
    return "no error"


def timeout_case(seconds: float):
    """Rank 1 never joins a collective on a reduction domain made with `seconds` of timeout. -> on rank 0, how
    long the collective waited before it failed."""
    import datetime
    import time

    groups = ParallelGroups(tp=dist.group.WORLD, timeout=datetime.timedelta(seconds=seconds))
    if dist.get_rank() == 1:
        time.sleep(4 * seconds)
        return None
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1), group=groups.domains["tp"])
    except RuntimeError:
        return time.monotonic() - start
    return "no timeout"


def memory_savers_case() -> dict:
    """One MoE model: its logits with attention computed for the whole batch and a sequence at a time; its
    calibrated state with the logits discarded (job-style) and kept. -> what the test compares."""
    from dist_quant.calibrate.pipeline import logits_discarded
    from dist_quant.modules import megatron as quantized
    from dist_quant.parallel.schedule import forward_only

    megatron_compat.initialize(1, 1)
    groups = ParallelGroups.from_megatron()
    data = batches(count=2)
    # the head's input calibrated too: what a discarded output must still see
    entries = [e for e in RECIPE["quantize"]["quant_cfg"] if e["quantizer_name"] != "*output_layer*"]
    recipe = {"quantize": {**RECIPE["quantize"], "quant_cfg": entries}}
    report = {}
    for discard in (False, True):
        model = build_model(moe=True)

        def loop(m, discard=discard):
            with logits_discarded(m) if discard else contextlib.nullcontext():
                report[f"outputs, discarded {discard}"] = forward_only(m, data, device(), keep_logits=not discard)

        quantize(model, recipe, loop, groups)
        report[f"state, discarded {discard}"] = logical_quant_state(model, groups)
    whole = _forward(model, data[0]).detach()
    budget = quantized.SCORES_BUDGET
    quantized.SCORES_BUDGET = 1  # one sequence at a time
    try:
        report["logits"] = (whole, _forward(model, data[0]).detach())
    finally:
        quantized.SCORES_BUDGET = budget
    return report


def attach_error(recipe) -> str | None:
    """attach_quantizers of `recipe` on the tiny MoE: -> its RecipeError's message, None if it attached."""
    from dist_quant.calibrate import attach_quantizers
    from dist_quant.recipe import RecipeError

    megatron_compat.initialize(1, 1)
    try:
        attach_quantizers(build_model(moe=True), recipe, ParallelGroups.from_megatron())
    except RecipeError as error:
        return str(error)
    return None


def local_model_on_rank_0(tp: int) -> float | None:
    """Under megatron's parallel state at TP `tp`, rank 0 alone quantizes a plain transformers model (as the QAT
    example's refit target): -> a calibrated amax on rank 0; the other ranks do nothing and return."""
    import transformers

    megatron_compat.initialize(tp, 1)
    if dist.get_rank() != 0:
        return None
    config = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = transformers.Qwen3ForCausalLM(config).eval()
    tokens = batches(count=1)[0]
    quantize(model, "nvfp4_default-fp8_cast_kv", lambda m: m(tokens))
    return model.model.layers[0].self_attn.q_proj.input_quantizer._amax.item()
