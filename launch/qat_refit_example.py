"""Quantization-aware training with periodic refits, on the built-in tiny Qwen3 (CPU or GPU).

A few optimizer steps run with NVFP4 fake quantization on (straight-through gradients); every --recalibrate
steps the weight amax follow the new weights (no forward pass); every --refit steps the weights and quantizer
state stream into a transformers model carrying the same quantizers, and its logits are checked against
Megatron's. Weight-only quantization keeps both sides bit-identical in their quantized weights, so they agree to
float arithmetic.

    python launch/qat_refit_example.py --steps 6
    torchrun --nproc-per-node 2 launch/qat_refit_example.py --steps 6    # the same, data-parallel
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch
import torch.nn.functional as F

RECIPE = {
    "quantize": {
        "quant_cfg": [
            {"quantizer_name": "*", "enable": False},
            {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": "e2m1", "block_sizes": {-1: 16}}},
            {"quantizer_name": "*output_layer*", "enable": False},
            {"quantizer_name": "*lm_head*", "enable": False},
        ]
    }
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--recalibrate", type=int, default=2, help="recalibrate weight amax every N steps")
    parser.add_argument("--refit", type=int, default=3, help="refit into the HF model every N steps")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seq-len", type=int, default=32)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", module=r"megatron(\.|$)")

    import transformers

    from dist_quant import load_recipe, quantize
    from dist_quant.bridge import ModelBridge
    from dist_quant.bridge.io import SafetensorsReader, load_hf_weights
    from dist_quant.calibrate import attach_quantizers, recalibrate_weights
    from dist_quant.job import builtin_checkpoint, init_distributed, rank
    from dist_quant.parallel import megatron_compat
    from dist_quant.parallel.groups import ParallelGroups
    from dist_quant.refit import apply_refit, refit_stream

    device = init_distributed()
    megatron_compat.initialize(1, 1)
    groups = ParallelGroups.from_megatron()
    checkpoint = builtin_checkpoint("tiny-qwen3", seed=0)
    bridge = ModelBridge.from_hf(checkpoint)
    megatron_compat.seed(0)
    model = bridge.build().to(device)
    load_hf_weights(model, bridge, SafetensorsReader(checkpoint), groups)
    quantize(model, RECIPE)
    hf = None
    if rank() == 0:
        hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager").to(device).eval()
        attach_quantizers(hf, load_recipe(RECIPE))

    text = torch.tensor(list(open(__file__, "rb").read()), device=device) % bridge.hf_config["vocab_size"]
    length = args.seq_len
    mask = megatron_compat.causal_attention_mask(length, device)
    positions = torch.arange(length, device=device)[None].expand(4, length)
    probe = text[: 2 * length].reshape(2, length)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(1000 + rank())  # each data-parallel rank its own batches
    for step in range(1, args.steps + 1):
        model.train()
        starts = torch.randint(0, len(text) - length - 1, (4,), generator=gen)
        tokens = torch.stack([text[s : s + length] for s in starts])
        targets = torch.stack([text[s + 1 : s + length + 1] for s in starts])
        logits = model(tokens, positions, mask)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        for p in model.parameters():  # data parallel by hand: average the gradients
            if p.grad is not None and groups.dp is not None:
                torch.distributed.all_reduce(p.grad, group=groups.dp)
                p.grad /= groups.size("dp")
        optimizer.step()
        line = f"step {step}: loss {loss.item():.4f}"
        if step % args.recalibrate == 0:
            recalibrate_weights(model)
            line += ", weight amax recalibrated"
        if step % args.refit == 0:
            model.eval()
            stream = refit_stream(model, bridge, groups)
            if hf is not None:
                apply_refit(hf, stream)
                with torch.no_grad():
                    megatron = model(probe, positions[:2], mask)
                    difference = (hf(probe).logits - megatron).abs().max().item()
                line += f", refit: HF vs Megatron logits differ by {difference:.2e}"
                if difference > 1e-4:
                    print(line + " (too much)", file=sys.stderr)
                    return 1
            else:
                for _ in stream:  # the other ranks send their pieces
                    pass
        if rank() == 0:
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
