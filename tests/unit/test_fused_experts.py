"""transformers' fused MoE experts quantized per expert (dist_quant/modules/fused_experts.py), on a local model."""

import torch

from dist_quant import quantize
from dist_quant.calibrate import recalibrate_weights
from tests.distributed.bridge_workers import hf_config

RECIPE = {"quantize": {"quant_cfg": [
    {"quantizer_name": "*", "enable": False},
    {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": "e2m1", "block_sizes": {-1: 16}}},
]}}


def test_recalibration_reads_the_fused_weights_after_the_model_moved():
    """An expert's weight is a view of the fused parameter; moving the model (`.to(device)`) gives that parameter
    new storage (`param.data = moved`, as nn.Module._apply does), and recalibration must read it, not the old one."""
    config, model_class = hf_config("qwen3_moe")
    torch.manual_seed(0)
    model = model_class(config).eval()
    quantize(model, RECIPE)
    experts = model.model.layers[1].mlp.experts
    for param in experts.parameters():
        param.data = param.data.clone()
    with torch.no_grad():
        experts.down_proj[2].mul_(3)
    recalibrate_weights(model)
    quantizer = experts.get_submodule("2.down_proj.weight_quantizer")
    assert quantizer._amax.item() == experts.down_proj[2].abs().max().item()
