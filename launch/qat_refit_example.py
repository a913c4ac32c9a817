"""Quantization-aware training with periodic refits, on a built-in tiny model (CPU or GPU; the MoE by default).

A few optimizer steps run with NVFP4 fake quantization on (straight-through gradients), sharded as --tp / --ep
say over the ranks torchrun starts (data parallel over the rest); every --recalibrate steps the weight amax follow
the new weights (no forward pass); every --refit steps the weights and quantizer state stream to rank 0 into a
transformers model carrying the same quantizers (its experts fused, as transformers keeps them), and its logits
are checked against Megatron's. Weight-only quantization keeps both sides bit-identical in their quantized
weights, so they agree to float arithmetic.

    python launch/qat_refit_example.py --steps 6
    torchrun --nproc-per-node 2 launch/qat_refit_example.py --steps 6 --ep 2            # experts over 2 ranks
    torchrun --nproc-per-node 4 launch/qat_refit_example.py --steps 6 --ep 4            # EP4
    torchrun --nproc-per-node 4 launch/qat_refit_example.py --steps 6 --model tiny-qwen3 --tp 2   # TP2 x DP2

megatron-core trains MoE layers under tensor parallelism only with sequence parallelism, which the models
dist_quant builds do not use: an MoE model takes --tp 1 here (expert and data parallelism).
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch

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
    parser.add_argument("--model", default="tiny-qwen3-moe", help="a built-in model (default tiny-qwen3-moe)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size (default 1)")
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
    from dist_quant.bridge.io import load_hf_weights, source_reader
    from dist_quant.calibrate import attach_quantizers, recalibrate_weights
    from dist_quant.job import CONFIGS, builtin_checkpoint, init_distributed, rank
    from dist_quant.parallel import megatron_compat
    from dist_quant.parallel.groups import ParallelGroups
    from dist_quant.refit import apply_refit, refit_stream

    bridge = ModelBridge.from_hf(CONFIGS / f"{args.model}.json")
    if bridge.moe and args.tp > 1:
        parser.error(f"--tp {args.tp}: megatron-core trains {args.model}'s MoE layers under tensor parallelism only with sequence parallelism; use --tp 1 (with --ep)")
    device = init_distributed()
    megatron_compat.initialize(args.tp, args.ep)
    groups = ParallelGroups.from_megatron()
    checkpoint = builtin_checkpoint(args.model, seed=0)
    megatron_compat.seed(0)
    model = bridge.build(args.tp, args.ep).to(device)
    load_hf_weights(model, bridge, source_reader(checkpoint, bridge), groups)
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
    # each data-parallel replica its own batches; the tensor-parallel ranks of a replica the same ones
    gen = torch.Generator().manual_seed(1000 + groups.rank("dp"))
    for step in range(1, args.steps + 1):
        model.train()
        starts = torch.randint(0, len(text) - length - 1, (4,), generator=gen)
        tokens = torch.stack([text[s : s + length] for s in starts])
        targets = torch.stack([text[s + 1 : s + length + 1] for s in starts])
        loss = model(tokens, positions, mask, labels=targets).mean()  # megatron's vocab-parallel cross entropy
        optimizer.zero_grad()
        loss.backward()
        for name, p in model.named_parameters():  # megatron's gradient finalization, by hand
            if p.grad is None:
                continue
            if groups.tp is not None and ("q_layernorm" in name or "k_layernorm" in name):
                # q/k norms are replicated but each TP rank normalizes its own heads: their gradients add up
                # (megatron-core's finalize_model_grads does the same)
                torch.distributed.all_reduce(p.grad, group=groups.tp)
            group = groups.dp if getattr(p, "allreduce", True) else groups.edp  # experts: their own replicas
            if group is not None:
                torch.distributed.all_reduce(p.grad, group=group)
                p.grad /= torch.distributed.get_world_size(group)
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
            else:
                for _ in stream:  # the other ranks send their pieces
                    pass
            with torch.no_grad():  # every rank: the experts and vocabulary pieces are spread over them
                megatron = _full_vocabulary(model(probe, positions[:2], mask), groups)
            if hf is not None:
                with torch.no_grad():
                    difference = ((hf(probe).logits - megatron).abs().max() / megatron.abs().max()).item()
                line += f", refit: HF vs Megatron logits differ by {difference:.1e} of their largest"
                if difference > 1e-5:  # float32 rounding is ~1e-7 of the largest logit here
                    print(line + " (too much)", file=sys.stderr)
                    return 1
        if rank() == 0:
            print(line, flush=True)
    return 0


def _full_vocabulary(logits: torch.Tensor, groups) -> torch.Tensor:
    """megatron's logits hold this rank's piece of the vocabulary under tensor parallelism."""
    if groups.tp is None:
        return logits
    pieces = [torch.empty_like(logits) for _ in range(groups.size("tp"))]
    torch.distributed.all_gather(pieces, logits.contiguous(), group=groups.tp)
    return torch.cat(pieces, -1)


if __name__ == "__main__":
    sys.exit(main())
