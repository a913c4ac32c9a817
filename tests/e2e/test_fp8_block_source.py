"""The calibrate job from an FP8 block-scaled checkpoint, as a user runs it: it exports the bytes the same job
exports from the bfloat16 checkpoint holding the dequantized weights, and says what it did to the source."""

import json
import shutil

import torch
from safetensors.torch import load_file, save_file

from dist_quant.export import load_tensors, verify
from tests.e2e.jobs import calibrate_on_ranks, run_cli, tiny_checkpoint
from tests.reference.fp8_blocks import SCALES_FILE, fp8_checkpoints

# Widths that are no multiples of 128 (partial tail blocks; TP2 slices that start inside a block), a dense and
# an MoE layer
WIDTHS = dict(hidden_size=192, head_dim=48, intermediate_size=320, moe_intermediate_size=160, num_experts=4,
              num_experts_per_tok=2, mlp_only_layers=[0])
NOTE = "the source is FP8 block-scaled (128x128 blocks, float32 scales): its FP8 weights are dequantized to bfloat16 on load"
JOB = ("--recipe", "nvfp4_default-fp8_cast_kv", "--calib-samples", "4", "--seq-len", "32")


def test_an_fp8_source_exports_the_bytes_its_dequantized_bf16_checkpoint_exports(tmp_path):
    fp8, reference = fp8_checkpoints(tiny_checkpoint(tmp_path / "bf16", "Qwen3MoeConfig", torch.bfloat16, **WIDTHS), tmp_path)
    outputs = {}
    for name, source in (("fp8", fp8), ("dequantized", reference)):
        outputs[name] = tmp_path / f"out-{name}"
        result = calibrate_on_ranks(2, "--hf-model", str(source), *JOB, "--tp", "2", "--out", str(outputs[name]))
        assert result.returncode == 0, result.stderr[-3000:]
        assert (f"  {NOTE}\n" in result.stdout and NOTE in result.stderr) == (name == "fp8"), result.stdout
        assert "TP 2 x EP 1 on 2 ranks, bfloat16" in result.stdout
    files = sorted(p.name for p in outputs["fp8"].iterdir())
    assert files == sorted(p.name for p in outputs["dequantized"].iterdir()) and "config.json" in files
    for file in files:
        assert (outputs["fp8"] / file).read_bytes() == (outputs["dequantized"] / file).read_bytes(), file
    config = json.loads((outputs["fp8"] / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "modelopt" and config["dtype"] == "bfloat16"
    exported = load_tensors(outputs["fp8"])
    assert not any(name.endswith("_scale_inv") for name in exported)
    assert exported["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16  # unquantized: the checkpoint's dtype
    inspected = run_cli("inspect", str(outputs["fp8"]))
    assert inspected.returncode == 0 and "verify: OK" in inspected.stdout, inspected.stderr


def test_random_weights_with_an_fp8_config_json_need_no_dequantization(tmp_path):
    fp8, _ = fp8_checkpoints(tiny_checkpoint(tmp_path / "bf16", "Qwen3MoeConfig", torch.bfloat16, **WIDTHS), tmp_path)
    config_only = tmp_path / "config-only"
    shutil.copytree(fp8, config_only, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    out = tmp_path / "out"
    result = calibrate_on_ranks(1, "--hf-model", str(config_only), "--random-weights", *JOB, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert NOTE not in result.stdout and verify(out)["quant_algo"] == "NVFP4"


def test_a_misshapen_block_scale_is_refused_at_startup_in_one_line(tmp_path):
    fp8, _ = fp8_checkpoints(tiny_checkpoint(tmp_path / "bf16", "Qwen3MoeConfig", torch.bfloat16, **WIDTHS), tmp_path)
    scales = load_file(fp8 / SCALES_FILE)
    name = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    scales[name] = scales[name][:, :1].contiguous()
    save_file(scales, fp8 / SCALES_FILE)
    result = run_cli("calibrate", "--hf-model", str(fp8), *JOB, "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr == (
        f"dist-quant: error: {fp8 / SCALES_FILE}: {name}: shape (2, 1), expected (2, 2): one scale per 128x128 block "
        "of model.layers.0.self_attn.o_proj.weight (192, 192) (config.json's weight_block_size)\n"
    )
