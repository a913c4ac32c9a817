"""A tiny random transformers model for tests (no downloads)."""

import pytest
import torch


def tiny_qwen3(gen: torch.Generator):
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16,
    )
    torch.manual_seed(gen.initial_seed())
    return transformers.Qwen3ForCausalLM(config).eval()
