"""What the conformance tests' rank runs: each case's checkpoint calibrated and exported at TP1."""

from __future__ import annotations

import torch

# FP8 attention, NVFP4 MLPs and experts, calibrated FP8 K/V, the head and routers alone: a MIXED_PRECISION export
MIXED_RECIPE = {"quantize": {"algorithm": "max", "quant_cfg": [
    {"quantizer_name": "*", "enable": False},
    {"quantizer_name": "*self_attention.linear_*.weight_quantizer", "cfg": {"num_bits": "e4m3"}},
    {"quantizer_name": "*self_attention.linear_*.input_quantizer", "cfg": {"num_bits": "e4m3"}},
    {"quantizer_name": "*mlp*weight_quantizer", "cfg": {"num_bits": "e2m1", "block_sizes": {-1: 16}}},
    {"quantizer_name": "*mlp*input_quantizer", "cfg": {"num_bits": "e2m1", "block_sizes": {-1: 16}}},
    {"quantizer_name": "*[kv]_bmm_quantizer", "cfg": {"num_bits": "e4m3"}},
    {"quantizer_name": "*router*", "enable": False},
    {"quantizer_name": "*output_layer*", "enable": False},
]}}

# FP8 attention (W8A8), NVFP4 weights alone in the MLPs and experts (W4A16_NVFP4): weight-only layers beside W8A8
MIXED_W4A16_RECIPE = {"quantize": {"algorithm": "max", "quant_cfg": [
    *(entry for entry in MIXED_RECIPE["quantize"]["quant_cfg"] if entry["quantizer_name"] != "*mlp*input_quantizer"),
]}}


# NVFP4 attention and dense MLPs, FP8 128x128 block routed experts (FP8_PB_WO, the one form of FP8 blocks a
# MIXED_PRECISION checkpoint holds for both engines), calibrated FP8 K/V
FP8_BLOCKS = {"num_bits": "e4m3", "block_sizes": {-1: 128, -2: 128}}
FP8_GROUPS = {"num_bits": "e4m3", "block_sizes": {-1: 128, "type": "dynamic"}}
MIXED_BLOCK_EXPERTS_RECIPE = {"quantize": {"algorithm": "max", "quant_cfg": [
    {"quantizer_name": "*", "enable": False},
    {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": "e2m1", "block_sizes": {-1: 16}}},
    {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": "e2m1", "block_sizes": {-1: 16}}},
    {"quantizer_name": "*experts.local_experts.*.weight_quantizer", "cfg": FP8_BLOCKS},
    {"quantizer_name": "*experts.local_experts.*.input_quantizer", "cfg": FP8_GROUPS},
    {"quantizer_name": "*[kv]_bmm_quantizer", "cfg": {"num_bits": "e4m3"}},
    {"quantizer_name": "*router*", "enable": False},
    {"quantizer_name": "*output_layer*", "enable": False},
]}}


def cast_kv(recipe):
    """The recipe (a built-in name or a dict) with its K/V cache entries cast (constant amax 448, a scale of 1.0)."""
    from dist_quant.recipe import load_recipe

    if isinstance(recipe, str):
        name = recipe.replace("-fp8_kv", "-fp8_cast_kv")
        load_recipe(name)  # a built-in
        return name
    entries = [
        {**e, "cfg": {**e["cfg"], "use_constant_amax": True}} if e["quantizer_name"] == "*[kv]_bmm_quantizer" else e
        for e in recipe["quantize"]["quant_cfg"]
    ]
    return {"quantize": {**recipe["quantize"], "quant_cfg": entries}}


def export_cases(cases: dict[str, tuple[str, object, str]]) -> None:
    """name -> (checkpoint, recipe, output directory)."""
    from dist_quant import quantize
    from dist_quant.export import export_hf
    from dist_quant.parallel import megatron_compat
    from dist_quant.parallel.groups import ParallelGroups
    from dist_quant.parallel.schedule import forward_only
    from tests.distributed.bridge_workers import load_checkpoint

    megatron_compat.initialize(1, 1)
    groups = ParallelGroups.from_megatron()
    data = [torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))]
    for path, recipe, out in cases.values():
        bridge, model = load_checkpoint(path, 1, 1, groups, seq_len=16)
        quantize(model, recipe, lambda m: forward_only(m, data, torch.device("cpu")), groups)
        export_hf(model, bridge, out, groups, source_dir=path)
