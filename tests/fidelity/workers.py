"""What each spawned rank runs for the fidelity tests: a transformers checkpoint loaded through the bridge at a
layout, calibrated on the oracle's tokens, its activation amax streamed out under Hugging Face names."""

from __future__ import annotations

import torch

from dist_quant import quantize
from dist_quant.bridge.io import export_hf_stream
from dist_quant.calibrate import quantizers
from dist_quant.parallel import megatron_compat
from dist_quant.parallel.groups import ParallelGroups
from dist_quant.parallel.schedule import forward_only
from dist_quant.quantizer import QuantizerMode
from dist_quant.recipe import RecipeError
from tests.distributed.bridge_workers import load_checkpoint, pipeline_logits
from tests.distributed.workers import device
from tests.fidelity.oracle import SEQ, batches

ACTIVATIONS = ("input_quantizer._amax", "k_bmm_quantizer._amax", "v_bmm_quantizer._amax")


def recipe(tied: bool) -> dict:
    """Every activation calibrated (max), nothing else; a head tied to the embedding cannot be quantized."""
    return {"quantize": {"algorithm": "max", "quant_cfg": [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": "e4m3"}},
        {"quantizer_name": "*[kv]_bmm_quantizer", "cfg": {"num_bits": "e4m3"}},
        *([{"quantizer_name": "*output_layer*", "enable": False}] if tied else []),
    ]}}


def _logits(model, groups) -> torch.Tensor:
    return pipeline_logits(model, groups, batches())


def calibrate_cases(paths: dict[str, str], tp: int, ep: int, pp: int = 1) -> dict:
    """Per checkpoint: its tensors streamed back out of megatron, megatron's logits before quantization and with
    every quantizer attached but disabled, and the calibrated activation amax by HF name (rank 0). Data-parallel ranks calibrate on their own share of the
    batches."""
    megatron_compat.initialize(tp, ep, pp=pp)
    groups = ParallelGroups.from_megatron()
    report = {}
    for name, path in paths.items():
        bridge, model = load_checkpoint(path, tp, ep, groups, SEQ, pp)
        round_trip = {name: tensor.cpu() for name, tensor in export_hf_stream(model, bridge, groups)}
        plain = _logits(model, groups)
        share = batches()[groups.rank("dp") :: groups.size("dp")]
        quantize(model, recipe(bridge.tied), lambda m: forward_only(m, share, device()), groups)
        amax = {
            hf: tensor.item()
            for hf, tensor in export_hf_stream(model, bridge, groups, quant_state=True)
            if hf.endswith(ACTIVATIONS)
        }
        for _, q in quantizers(model):
            q.mode = QuantizerMode.DISABLED
        report[name] = {"plain_logits": plain, "disabled_logits": _logits(model, groups), "amax": amax, "round_trip": round_trip}
        if bridge.tied:
            report[name]["tied_head_error"] = _quantize_tied_head(path, tp, ep, pp, groups)
    return report


def _quantize_tied_head(path: str, tp: int, ep: int, pp: int, groups) -> str | None:
    _, model = load_checkpoint(path, tp, ep, groups, SEQ, pp)
    try:
        quantize(model, recipe(tied=False), lambda m: None, groups)
    except RecipeError as error:
        return str(error)
    return None
