"""What each spawned rank runs for the core attention tests: a built-in model as the bridge builds it
(`SdpaDotProductAttention`), its attention computed fused and by megatron's local attention, compared."""

from __future__ import annotations

import torch

from dist_quant.bridge import ModelBridge
from dist_quant.calibrate import attach_quantizers, calibrate
from dist_quant.job import CONFIGS
from dist_quant.modules import megatron as quantized
from dist_quant.parallel import megatron_compat
from dist_quant.parallel.groups import ParallelGroups
from dist_quant.recipe import load_recipe
from tests.distributed import workers

BATCH, SEQ = 3, 40


def _own_causal_mask(seq: int) -> torch.Tensor:
    """A causal mask of one's own: the same values as `causal_attention_mask`'s, not marked."""
    return torch.ones(seq, seq, dtype=torch.bool, device=workers.device()).triu(1)[None, None]


def fused_and_local_case(model_name: str, tp: int) -> dict:
    """-> the logits (this rank's vocabulary shard) under a marked causal mask, under None, and under a mask of
    one's own (megatron's local attention), before and after quantizers (NVFP4, FP8 K/V casts) are calibrated,
    with how many times megatron's local attention ran for each; which forwards `fused` admits."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    megatron_compat.initialize(tp, 1)
    groups = ParallelGroups.from_megatron()
    bridge = ModelBridge.from_hf(CONFIGS / f"{model_name}.json")
    megatron_compat.seed(0)
    where = workers.device()
    model = bridge.build(tp, dtype=torch.float32, device=where).to(where).eval()
    cores = [m for m in model.modules() if isinstance(m, DotProductAttention)]
    tokens = torch.randint(0, bridge.hf_config["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0)).to(where)
    positions = torch.arange(SEQ, device=where)[None].expand(BATCH, SEQ)
    local_calls = [0]
    local_forward = DotProductAttention.forward

    def counted_local_forward(self, *args, **kwargs):  # counted in this spawned process only
        local_calls[0] += 1
        return local_forward(self, *args, **kwargs)

    DotProductAttention.forward = counted_local_forward
    report = {"classes": sorted({type(core).__name__ for core in cores})}

    def forwards(label: str) -> None:
        for mask_label, mask in (("marked", megatron_compat.causal_attention_mask(SEQ, where)), ("none", None),
                                 ("own", _own_causal_mask(SEQ))):
            local_calls[0] = 0
            with torch.no_grad():
                report[f"{label}, {mask_label}"] = (model(tokens, positions, mask).cpu(), local_calls[0])

    forwards("plain")
    recipe = load_recipe("nvfp4_default-fp8_cast_kv")
    attach_quantizers(model, recipe, groups)
    calibrate(model, recipe, lambda m: m(tokens, positions, megatron_compat.causal_attention_mask(SEQ, where)), groups)
    budget = quantized.SCORES_BUDGET
    quantized.SCORES_BUDGET = 1  # megatron's local attention one sequence at a time; the fused one takes them all
    try:
        forwards("quantized")
    finally:
        quantized.SCORES_BUDGET = budget
    core = cores[0]
    query = key = torch.zeros(SEQ, 1, 1, 1, device=where)
    written = megatron_compat.causal_attention_mask(SEQ, where)
    written[..., 0, 1] = False  # no longer causal, and its version says so
    core.train()
    core.attention_dropout.p = 0.1
    in_training = core.fused(query, key, None)
    core.attention_dropout.p = 0.0
    report["fused"] = {
        "marked": core.fused(query, key, megatron_compat.causal_attention_mask(SEQ, where)),
        "none": core.fused(query, key, None),
        "own": core.fused(query, key, _own_causal_mask(SEQ)),
        "marked, then written": core.fused(query, key, written),
        "cross-attention": core.fused(query, torch.zeros(SEQ + 1, 1, 1, 1, device=where), None),
        "dropout in training": in_training,
        "training without dropout": core.fused(query, key, None),
    }
    return report
