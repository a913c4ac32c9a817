"""What each spawned rank runs for the grouped experts tests: one MoE model, its MoE layers computed grouped and
by megatron's SequentialMLP (the `grouped` switch), compared."""

from __future__ import annotations

from pathlib import Path

import torch

from dist_quant.calibrate import attach_quantizers, calibrate
from dist_quant.calibrate.pipeline import CalibrationError
from dist_quant.modules.megatron import GroupedExperts, _stacked_in_memory, group_experts
from dist_quant.parallel import megatron_compat
from dist_quant.parallel.groups import ParallelGroups
from dist_quant.quantizer import SegmentAmax
from dist_quant.recipe import load_recipe
from tests.distributed import workers

EXPERTS = 8  # 6 live experts of top-2 routing (workers.DEAD_EXPERTS never picked)
WAYS = {False: "sequential", True: "grouped"}


def _set_grouped(model, grouped: bool) -> list:
    layers = [m for m in model.modules() if isinstance(m, GroupedExperts)]
    for layer in layers:
        layer.grouped = grouped
    return layers


def calibration_case(tp: int, ep: int) -> dict:
    """A model of one's own (megatron's SequentialMLP, dead experts: segments without rows) opting in with
    `group_experts`, calibrated and evaluated both ways. -> per way: the logical quant state (or the calibration
    error), the quantized logits, how often any expert quantizer was called (calibrating, quantizing), how many
    one-pass amax collections and one-launch fake quantizations ran."""
    from dist_quant import kernels

    megatron_compat.initialize(tp, ep)
    groups = ParallelGroups.from_megatron()
    model = workers.build_model(moe=True, expert_bias=True, experts=EXPERTS)
    report = {"layers": group_experts(model)}
    recipe = load_recipe(workers.RECIPE)
    attach_quantizers(model, recipe, groups)
    calls, one_pass, one_launch = [0], [0], [0]
    collect, fake_quant_segments = SegmentAmax.collect, kernels.nvfp4_fake_quant_segments

    def counted_collect(self, *args):  # counted in this spawned process only
        one_pass[0] += 1
        collect(self, *args)

    def counted_fake_quant_segments(*args):
        one_launch[0] += 1
        return fake_quant_segments(*args)

    SegmentAmax.collect = counted_collect
    kernels.nvfp4_fake_quant_segments = counted_fake_quant_segments
    experts = [layer for layer in model.modules() if isinstance(layer, GroupedExperts)]
    for layer in experts:
        for expert in layer.local_experts:
            for linear in (expert.linear_fc1, expert.linear_fc2):
                for q in (linear.input_quantizer, linear.weight_quantizer):
                    q.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    data = workers.batches(count=4)
    for grouped, way in WAYS.items():
        _set_grouped(model, grouped)
        calls[0] = one_pass[0] = one_launch[0] = 0
        entry = {}
        try:
            calibrate(model, recipe, lambda m: [workers._forward(m, t) for t in data], groups)
            entry["state"] = workers.logical_quant_state(model, groups)
        except CalibrationError as error:
            entry["error"] = str(error)
        entry["calibration_calls"], entry["one_pass"] = calls[0], one_pass[0]
        if "state" in entry:
            calls[0] = one_launch[0] = 0
            entry["logits"] = workers.logits(model, workers.batches(seed=7, count=1)[0], groups)
            entry["quantizing_calls"], entry["one_launch"] = calls[0], one_launch[0]
        report[way] = entry
    # the experts' weights are read where they lie, one stacked tensor per role; once a parameter is moved
    # elsewhere they are stacked per forward, to the same logits
    roles = [[getattr(e, which) for e in layer.local_experts] for layer in experts for which in ("linear_fc1", "linear_fc2")]
    report["in_memory"] = [_stacked_in_memory(linears[0], [lin.weight for lin in linears]) is not None for linears in roles]
    moved = roles[0][-1].weight
    moved.data = moved.data.clone()
    report["in_memory_after_a_move"] = _stacked_in_memory(roles[0][0], [lin.weight for lin in roles[0]]) is not None
    report["stale_stack_kept"] = "_stacked_expert_weights" in roles[0][0].__dict__  # its memory let go
    _set_grouped(model, True)
    report["logits_after_a_move"] = workers.logits(model, workers.batches(seed=7, count=1)[0], groups)
    return report


def nan_case(tp: int, ep: int) -> dict:
    """NaN in one expert's fc1 input (the grouped way sees it in its one pass). -> the error of each way."""
    megatron_compat.initialize(tp, ep)
    groups = ParallelGroups.from_megatron()
    model = workers.build_model(moe=True, expert_bias=True, experts=EXPERTS)
    group_experts(model)
    recipe = load_recipe(workers.RECIPE)
    attach_quantizers(model, recipe, groups)
    layer = next(m for m in model.modules() if isinstance(m, GroupedExperts))

    def poisoned(module, args):  # the layer's input with a NaN in the first row: the first live expert's
        hidden = args[0].index_fill(0, torch.tensor([0], device=args[0].device), float("nan"))
        return (hidden, *args[1:])

    layer.register_forward_pre_hook(poisoned)
    errors = {}
    for grouped, way in WAYS.items():
        _set_grouped(model, grouped)
        try:
            calibrate(model, recipe, lambda m: workers._forward(m, workers.batches(count=1)[0]), groups)
            errors[way] = "no error"
        except CalibrationError as error:
            errors[way] = str(error)
    return errors


def export_case(tp: int, ep: int, out: str) -> dict:
    """The built-in tiny Qwen3-MoE as the job builds it (grouped), calibrated and exported both ways into
    `out`/<way>. -> per way: the logical quant state and the quantized logits; the export directories."""
    from dist_quant.bridge import ModelBridge
    from dist_quant.export import export_hf
    from dist_quant.job import CONFIGS

    megatron_compat.initialize(tp, ep)
    groups = ParallelGroups.from_megatron()
    bridge = ModelBridge.from_hf(CONFIGS / "tiny-qwen3-moe.json")
    megatron_compat.seed(0)
    model = bridge.build(tp, ep).to(workers.device()).eval()
    vocab = bridge.hf_config["vocab_size"]
    data = [torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    recipe = load_recipe("nvfp4_default-fp8_cast_kv")
    attach_quantizers(model, recipe, groups)
    report = {"layers": len(_set_grouped(model, True))}
    for grouped, way in WAYS.items():
        _set_grouped(model, grouped)
        calibrate(model, recipe, lambda m: [workers._forward(m, t) for t in data], groups)
        report[way] = {
            "state": workers.logical_quant_state(model, groups),
            "logits": workers.logits(model, data[0], groups),
            "export": str(export_hf(model, bridge, Path(out) / way, groups)),
        }
    return report


def training_cases(tp: int, ep: int, variants: dict) -> dict:
    """Per variant (name -> (quantized, TransformerConfig keys to change)): one forward and backward of a model of
    one's own, plain or fake-quantized (QAT), both ways. -> per variant and way: the loss, the logits and every
    parameter's gradient by logical name, and whether the expert MLP modules ran (SequentialMLP's way)."""
    megatron_compat.initialize(tp, ep)
    groups = ParallelGroups.from_megatron()
    return {name: _training_case(groups, quantized, config) for name, (quantized, config) in variants.items()}


def _training_case(groups: ParallelGroups, quantized: bool, config: dict) -> dict:
    model = build_model(hidden_dropout=0.0, attention_dropout=0.0, **config)  # the same forward both ways
    group_experts(model)
    if quantized:
        recipe = load_recipe(workers.RECIPE)
        attach_quantizers(model, recipe, groups)
        calibrate(model, recipe, lambda m: [workers._forward(m, t) for t in workers.batches(count=2)], groups)
    model.train()
    tokens = workers.batches(seed=5, count=1)[0]
    logical = workers.logical_namer(model, groups.rank("ep"))
    report = {}
    for grouped, way in WAYS.items():
        layers = _set_grouped(model, grouped)
        ran = [0]
        hooks = [layer.local_experts[0].register_forward_hook(lambda *_: ran.__setitem__(0, ran[0] + 1)) for layer in layers]
        model.zero_grad(set_to_none=True)
        logits = workers._forward(model, tokens)
        loss = logits.float().pow(2).mean()
        loss.backward()
        for hook in hooks:
            hook.remove()
        report[way] = {
            "loss": loss.detach().cpu(),
            "logits": logits.detach().cpu(),
            "grads": {logical(n): p.grad.cpu().clone() for n, p in model.named_parameters() if p.grad is not None},
            "expert_modules_ran": ran[0] > 0,
        }
    report["expert_parameters"] = sum(".local_experts." in n for n, _ in model.named_parameters())
    return report


def build_model(**changes):
    """workers.build_model's MoE (dead experts and all), with TransformerConfig keys changed (before megatron
    derives the rest of its config from them)."""
    from megatron.core.transformer import TransformerConfig

    original = TransformerConfig.__post_init__

    def changed(self):
        for key, value in changes.items():
            setattr(self, key, value)
        original(self)

    TransformerConfig.__post_init__ = changed
    try:
        return workers.build_model(moe=True, expert_bias=True, experts=EXPERTS)
    finally:
        TransformerConfig.__post_init__ = original
