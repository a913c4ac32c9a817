"""Running the job as a user does, for the end-to-end tests."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_python(*args, timeout=300, env=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


def torchrun(ranks, *args, **kwargs):
    return run_python("-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "-m", "dist_quant.cli", "calibrate", *args, **kwargs)


TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)


def tiny_checkpoint(path: Path, config_class: str, dtype, **config) -> Path:
    """A checkpoint transformers writes for a tiny model of `config_class` (random weights)."""
    import torch
    import transformers

    torch.manual_seed(0)
    hf_config = getattr(transformers, config_class)(**{**TINY, **config})
    transformers.AutoModelForCausalLM.from_config(hf_config).to(dtype).save_pretrained(path)
    return path


def tiny_qwen3_moe(path: Path, dtype, **config) -> Path:
    return tiny_checkpoint(path, "Qwen3MoeConfig", dtype, **{"moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2, **config})
