"""DeepSeek-V3 as a user runs it: the block-FP8 release (here a tiny one, widths no multiples of 128) calibrated at
TP2 x EP2 on 4 ranks from the command line, exported for vLLM and SGLang: multi-latent attention's fused down
projections with one scale, the latent KV cache at a scale of 1.0, the multi-token-prediction layer left out; a
calibrated KV cache refused before any rank starts."""

import json

import torch
from safetensors.torch import load_file, save_file

from dist_quant.export import load_tensors
from tests.e2e.jobs import calibrate_on_ranks, run_cli, tiny_checkpoint
from tests.reference.fp8_blocks import fp8_checkpoints

WIDTHS = dict(
    hidden_size=192, intermediate_size=320, moe_intermediate_size=160, num_attention_heads=4, num_key_value_heads=4,
    q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=4,
    num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, n_shared_experts=1,
)
JOB = ("--calib-samples", "4", "--seq-len", "32")


def _with_an_mtp_layer(checkpoint):
    """DeepSeek-V3's release holds its multi-token-prediction layer as model.layers.<num_hidden_layers>."""
    config = json.loads((checkpoint / "config.json").read_text())
    layers = config["num_hidden_layers"]
    assert config["num_nextn_predict_layers"] == 1
    tensors = load_file(checkpoint / "model.safetensors")
    tensors[f"model.layers.{layers}.eh_proj.weight"] = torch.zeros(192, 384, dtype=torch.bfloat16)
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})
    return checkpoint


def test_a_block_fp8_deepseek_v3_calibrates_at_tp2_ep2_and_exports_what_the_engines_load(tmp_path):
    source = _with_an_mtp_layer(tiny_checkpoint(tmp_path / "bf16", "DeepseekV3Config", torch.bfloat16, **WIDTHS))
    fp8, _ = fp8_checkpoints(source, tmp_path)
    out = tmp_path / "out"
    result = calibrate_on_ranks(
        4, "--hf-model", str(fp8), "--recipe", "nvfp4_default-fp8_cast_kv", *JOB, "--tp", "2", "--ep", "2", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "TP 2 x EP 2 on 4 ranks, bfloat16" in result.stdout and "dequantized to bfloat16 on load" in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 0 and config["quantization_config"]["kv_cache_scheme"]["num_bits"] == 8
    tensors = load_tensors(out)
    assert not any(name.startswith("model.layers.2.") for name in tensors)  # the MTP layer: left out
    for layer in (0, 1):
        attention = f"model.layers.{layer}.self_attn"
        # vLLM's fused_qkv_a_proj keeps one weight_scale_2 and input_scale (SGLang takes q_a_proj's)
        for scale in ("weight_scale_2", "input_scale"):
            assert torch.equal(tensors[f"{attention}.q_a_proj.{scale}"], tensors[f"{attention}.kv_a_proj_with_mqa.{scale}"])
        assert tensors[f"{attention}.k_proj.k_scale"] == 1.0 == tensors[f"{attention}.v_proj.v_scale"]
    inspected = run_cli("inspect", str(out))
    assert inspected.returncode == 0 and "verify: OK" in inspected.stdout, inspected.stderr


def test_a_calibrated_kv_cache_on_multi_latent_attention_is_refused_in_one_line(tmp_path):
    source = tiny_checkpoint(tmp_path / "bf16", "DeepseekV3Config", torch.bfloat16, **WIDTHS)
    result = run_cli("calibrate", "--hf-model", str(source), "--recipe", "nvfp4_default-fp8_kv", *JOB, "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(
        "dist-quant: error: recipe nvfp4_default-fp8_kv (built-in): decoder.layers.0.self_attention.core_attention: "
        "multi-latent attention caches one row per token"
    ), result.stderr
