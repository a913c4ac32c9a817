"""Recipes through the whole job: weight-only NVFP4 and FP8 128x128 blocks export as the engines load them, and a
recipe the checkpoint cannot hold is refused at startup, in one line, before any rank starts."""

import json

import pytest

import torch

from dist_quant.export import load_tensors, verify
from tests.e2e.jobs import calibrate_on_ranks, run_cli, tiny_qwen3_moe

NVFP4 = "{num_bits: e2m1, block_sizes: {-1: 16, type: dynamic, scale_bits: e4m3}}"


def recipe_file(path, *entries: str):
    path.write_text("quantize:\n  algorithm: {method: max}\n  quant_cfg:\n  - {quantizer_name: '*', enable: false}\n"
                    + "".join(f"  - {entry}\n" for entry in entries))
    return path


def test_weight_only_nvfp4_with_its_head_exports_as_w4a16_and_verifies(tmp_path):
    """What issue 25 met: NVFP4 weights only, the head included, failed verification after calibration ("lm_head.
    input_scale is missing")."""
    recipe = recipe_file(tmp_path / "w4a16.yaml", f"{{quantizer_name: '*weight_quantizer', cfg: {NVFP4}}}",
                         "{quantizer_name: '*[kv]_bmm_quantizer', cfg: {num_bits: e4m3, use_constant_amax: true}}")
    out = tmp_path / "out"
    result = calibrate_on_ranks(2, "--model", "tiny-qwen3-moe", "--recipe", str(recipe), "--ep", "2",
                                "--seq-len", "16", "--calib-samples", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert verify(out)["quant_algo"] == "W4A16_NVFP4"
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_algo"] == "W4A16_NVFP4"
    tensors = load_tensors(out)
    assert tensors["lm_head.weight"].dtype.itemsize == 1 and "lm_head.weight_scale_2" in tensors
    assert not any(name.endswith(".input_scale") for name in tensors)


def test_the_builtin_fp8_block_recipe_exports_the_native_fp8_form(tmp_path):
    """A Qwen3-MoE with heads of 128 channels and experts of 128 rows, at EP2: config.json's quantization_config is
    the engines' native fp8 one, with no hf_quant_config.json, and every quantized linear holds its weight and its
    float32 weight_scale_inv."""
    source = tiny_qwen3_moe(tmp_path / "source", torch.bfloat16, hidden_size=128, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=128, moe_intermediate_size=128)
    out = tmp_path / "out"
    result = calibrate_on_ranks(2, "--hf-model", str(source), "--recipe", "fp8_block_default-fp8_cast_kv", "--ep", "2",
                                "--seq-len", "16", "--calib-samples", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (verify(out)["quant_method"], verify(out)["warnings"]) == ("fp8", [])
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["weight_block_size"], qc["kv_cache_quant_algo"]) == ("fp8", [128, 128], "FP8")
    assert not (out / "hf_quant_config.json").exists()
    tensors = load_tensors(out)
    assert tensors["model.layers.1.mlp.experts.3.down_proj.weight_scale_inv"].dtype == torch.float32
    assert not any(name.endswith((".input_scale", ".weight_scale", ".weight_scale_2")) for name in tensors)
    # the export is a source in turn (an FP8 block-scaled checkpoint with an FP8 KV cache): a second job reads it,
    # its K/V cache scales left unread, and writes the same FP8 weights and block scales again: each block's amax
    # came from bf16 weights, so 448 x its scale rounds back to it in bf16, and every value to its own E4M3 code
    again = tmp_path / "again"
    result = calibrate_on_ranks(2, "--hf-model", str(out), "--recipe", "fp8_block_default-fp8_cast_kv", "--ep", "2",
                                "--seq-len", "16", "--calib-samples", "2", "--out", str(again))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "KV cache scales are not read" in result.stdout
    requantized = load_tensors(again)
    assert requantized.keys() == tensors.keys()
    for name in (n for n in tensors if n.endswith(("_scale_inv", "proj.weight")) and tensors[n].dtype.itemsize == 1):
        assert torch.equal(requantized[name].view(torch.uint8), tensors[name].view(torch.uint8)), name
        assert torch.equal(requantized[name + "_scale_inv"] if name.endswith("weight") else requantized[name],
                           tensors[name + "_scale_inv"] if name.endswith("weight") else tensors[name]), name


REFUSED = {
    "fp8-weight-only": (
        ("{quantizer_name: '*weight_quantizer', cfg: {num_bits: e4m3}}",), "tiny-qwen3-moe",
        ": decoder.layers.0.self_attention.linear_qkv.weight_quantizer / input_quantizer: FP8 weights with "
        "unquantized inputs (weight-only FP8) have no checkpoint form vLLM or SGLang load",
    ),
    "per-channel-fp8": (
        ("{quantizer_name: '*weight_quantizer', cfg: {num_bits: e4m3, axis: 0}}",
         "{quantizer_name: '*input_quantizer', cfg: {num_bits: e4m3}}"), "tiny-qwen3",
        ": decoder.layers.0.self_attention.linear_qkv.weight_quantizer: per-channel FP8 weight scales (axis: 0)",
    ),
    "output-quantizer": (
        (f"{{quantizer_name: '*weight_quantizer', cfg: {NVFP4}}}",
         "{quantizer_name: '*linear_fc2.output_quantizer', cfg: {num_bits: e4m3}}"), "tiny-qwen3",
        ": decoder.layers.0.mlp.linear_fc2.output_quantizer: the checkpoint format has no output scales",
    ),
    "fp8-blocks-narrow-heads": (
        ("{quantizer_name: '*weight_quantizer', cfg: {num_bits: e4m3, block_sizes: {-1: 128, -2: 128}}}",
         "{quantizer_name: '*output_layer*', enable: false}"), "tiny-qwen3",
        ": decoder.layers.0.self_attention.linear_qkv: heads of 32 channels: Megatron's fused q/k/v weight holds each "
        "query group's q, k and v rows in turn",
    ),
    "kv-only": (
        ("{quantizer_name: '*[kv]_bmm_quantizer', cfg: {num_bits: e4m3}}",), "tiny-qwen3-moe",
        ": the recipe quantizes no linear weight",
    ),
}


@pytest.mark.parametrize("entries, model, text", REFUSED.values(), ids=REFUSED.keys())
def test_a_recipe_the_checkpoint_cannot_hold_fails_at_startup_in_one_line(tmp_path, entries, model, text):
    recipe = recipe_file(tmp_path / "recipe.yaml", *entries)
    result = run_cli("calibrate", "--model", model, "--recipe", str(recipe), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"dist-quant: error: recipe {recipe}{text}"), result.stderr
    assert not (tmp_path / "out").exists()


def test_a_builtin_recipe_for_experts_alone_is_refused_for_a_dense_model(tmp_path):
    result = run_cli("calibrate", "--model", "tiny-qwen3", "--recipe", "nvfp4_experts_only_mse-fp8_cast_kv",
                     "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stderr == (
        "dist-quant: error: recipe nvfp4_experts_only_mse-fp8_cast_kv (built-in): the recipe quantizes no linear "
        "weight: the checkpoint format describes quantized weights (for an FP8 KV cache alone, serve the "
        "unquantized model with the engine's FP8 KV cache)\n"
    ), result.stderr
