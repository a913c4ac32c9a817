"""What the FP8-block export tests' ranks run: calibrate, export, and the streams an engine would be refit with."""

from __future__ import annotations

import torch

from dist_quant.parallel.schedule import forward_only
from tests.distributed.bridge_workers import loaded_model
from tests.distributed.workers import device

SEQ = 16


def export_and_streams(path: str, out: str, tp: int, ep: int, pp: int, recipe, writers: str = "one") -> dict:
    """Calibrate the checkpoint's model at a layout and export it; then, on rank 0, the quantized refit stream and the
    weights the calibrated model computes with (each quantized weight replaced by its weight quantizer's fake
    quantization, on the rank that holds it, and streamed under its Hugging Face name)."""
    from dist_quant import quantize
    from dist_quant.export import export_hf
    from dist_quant.modules import QuantModule
    from dist_quant.refit import refit_stream

    groups, bridge, model = loaded_model(path, tp, ep, pp)
    gen = torch.Generator().manual_seed(11)
    data = [torch.randint(0, 256, (2, SEQ), generator=gen) for _ in range(2)]
    quantize(model, recipe, lambda m: forward_only(m, data, device()))
    export_hf(model, bridge, out, groups, source_dir=path, max_shard_bytes=256 << 10, writers=writers)
    quantized = [(name, tensor.cpu().clone()) for name, tensor in refit_stream(model, bridge, groups, quantized=True)]
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, QuantModule):
                for quantizer, weight in module.weight_quantizers():
                    if quantizer.enabled:
                        weight.copy_(quantizer(weight))
    fake = {name: tensor.cpu().clone() for name, tensor in refit_stream(model, bridge, groups) if name.endswith(".weight")}
    return {"quantized": quantized, "fake": fake} if torch.distributed.get_rank() == 0 else {}
