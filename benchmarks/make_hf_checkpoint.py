#!/usr/bin/env python3
"""Write a Hugging Face checkpoint made by transformers (random weights), for `dist-quant calibrate --hf-model`
runs that must start from a checkpoint as users have them: the model class, config.json and safetensors files
are transformers' own, not ours. It gets the tests' byte-level tokenizer (one token per byte), since the job
calibrates a checkpoint on its tokenizer's tokens (or on token ids given as data).

    python3 benchmarks/make_hf_checkpoint.py --out /tmp/qwen3-moe-bf16 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from tests.e2e.jobs import byte_tokenizer  # noqa: E402 - the tokenizer the tests' checkpoints have

# A Qwen3-MoE shaped like Qwen3-30B-A3B in its ratios, small enough to write in seconds: 0.5B parameters.
QWEN3_MOE = dict(
    vocab_size=32768, hidden_size=1024, intermediate_size=3072, moe_intermediate_size=384, num_hidden_layers=8,
    num_attention_heads=16, num_key_value_heads=4, head_dim=128, num_experts=32, num_experts_per_tok=8,
    norm_topk_prob=True, max_position_embeddings=4096, rope_theta=1000000.0, tie_word_embeddings=False,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nan", metavar="TENSOR", help="put a NaN into this tensor (to check that the job says so)")
    args = parser.parse_args()
    import transformers

    torch.manual_seed(args.seed)
    config = transformers.Qwen3MoeConfig(**QWEN3_MOE)
    model = transformers.Qwen3MoeForCausalLM(config).to(getattr(torch, args.dtype))
    model.save_pretrained(args.out)
    byte_tokenizer().save_pretrained(args.out)
    if args.nan:
        from safetensors.torch import load_file, save_file

        for file in Path(args.out).glob("*.safetensors"):
            tensors = load_file(file)
            if args.nan in tensors:
                tensors[args.nan].view(-1)[0] = float("nan")
                save_file(tensors, file, metadata={"format": "pt"})
    print(f"{args.out}: Qwen3MoeForCausalLM, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, {args.dtype}")


if __name__ == "__main__":
    main()
