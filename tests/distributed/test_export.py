"""Export of a calibrated, sharded Qwen3-MoE to the unified HF checkpoint format, and its verifier."""

import json
import shutil

import pytest
import torch

from dist_quant.export import VerificationError, load_tensors, verify
from dist_quant.numerics import nvfp4_dequantize
from dist_quant.parallel.spawn import run_ranks
from tests.distributed import bridge_workers as workers

pytestmark = pytest.mark.xdist_group("megatron")
RECIPE = "nvfp4_default-fp8_kv"
ACTIVATION_SCALES = (".input_scale", ".k_scale", ".v_scale")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    checkpoint = workers.write_checkpoints(root)["qwen3_moe"][0]
    runs = {}
    layouts = {"tp1": (1, 1, 1, RECIPE), "tp2xep2": (4, 2, 2, RECIPE), "fp8-tp2": (2, 2, 1, "fp8_default-fp8_cast_kv")}
    for name, (world, tp, ep, recipe) in layouts.items():
        out = root / name
        runs[name] = (out, run_ranks(world, workers.calibrate_and_export, str(checkpoint), str(out), tp, ep, recipe)[0])
    return checkpoint, runs


def test_fp8_export_with_cast_kv(exports):
    out = exports[1]["fp8-tp2"][0]
    assert verify(out)["quant_algo"] == "FP8"
    tensors = load_tensors(out)
    assert tensors["model.layers.0.mlp.experts.1.gate_proj.weight"].dtype == torch.float8_e4m3fn
    assert tensors["model.layers.0.mlp.experts.1.gate_proj.weight_scale"].shape == ()
    assert tensors["model.layers.1.self_attn.k_proj.k_scale"] == 1.0 == tensors["model.layers.1.self_attn.v_proj.v_scale"]


def test_sharded_export_matches_the_unsharded_one(exports):
    _, runs = exports
    single, sharded = load_tensors(runs["tp1"][0]), load_tensors(runs["tp2xep2"][0])
    assert single.keys() == sharded.keys()
    assert any(k.endswith("experts.3.down_proj.weight_scale_2") for k in single) and any(k.endswith(".k_scale") for k in single)
    for name, tensor in single.items():
        if name.endswith(ACTIVATION_SCALES):
            torch.testing.assert_close(sharded[name], tensor, rtol=1e-6, atol=0, msg=name)
        else:
            assert sharded[name].dtype == tensor.dtype, name
            assert torch.equal(sharded[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name


def test_checkpoint_layout_and_configs(exports):
    checkpoint, runs = exports
    out = runs["tp2xep2"][0]
    quant = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert quant == {
        "quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8", "group_size": 16,
        "exclude_modules": ["lm_head", "model.layers.0.mlp.gate", "model.layers.1.mlp.gate"],
    }
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["kv_cache_scheme"] == {"type": "float", "num_bits": 8}
    assert (out / "generation_config.json").is_file() and len(list(out.glob("model-*-of-*.safetensors"))) > 1
    tensors = load_tensors(out)
    w = tensors["model.layers.0.self_attn.q_proj.weight"]
    assert w.dtype == torch.uint8 and w.shape == (64, 32) and tensors["model.layers.0.self_attn.q_proj.weight_scale"].shape == (64, 4)
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32 and verify(out)["quantized_modules"] == 32


def test_dequantized_checkpoint_in_transformers_matches_megatron_fake_quant(exports, tmp_path):
    # The exported weights dequantize to exactly the fake-quant weights, so a transformers model holding them
    # differs from Megatron's weight-only fake-quant forward by float arithmetic alone, as the unquantized
    # bridge test does (~1e-7): 1e-5 is that tolerance. (Activation scales apply at inference, in vLLM.)
    import transformers
    from safetensors.torch import save_file

    checkpoint, runs = exports
    out, report = runs["tp2xep2"]
    tensors = load_tensors(out)
    dense = {}
    for name, tensor in tensors.items():
        module = name[: -len(".weight")]
        if name.endswith(".weight") and f"{module}.weight_scale_2" in tensors:
            dense[name] = nvfp4_dequantize(tensor, tensors[f"{module}.weight_scale"], tensors[f"{module}.weight_scale_2"])
        elif not name.endswith((".weight_scale", ".weight_scale_2", *ACTIVATION_SCALES)):
            dense[name] = tensor
    shutil.copy(checkpoint / "config.json", tmp_path / "config.json")
    save_file(dense, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = model(workers.probe_tokens()).logits
    torch.testing.assert_close(logits, report["weight_only_logits"], rtol=0, atol=1e-5)


def _corrupt(source, target, edit_tensors=None, edit_quant=None):
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    if edit_quant:
        path = target / "hf_quant_config.json"
        config = json.loads(path.read_text())
        edit_quant(config)
        path.write_text(json.dumps(config))
    if edit_tensors:
        for file in target.glob("model-*.safetensors"):
            tensors = load_file(file)
            edit_tensors(tensors)
            save_file(tensors, file, metadata={"format": "pt"})
    return target


def _nan_scale(t):
    name = "model.layers.1.self_attn.o_proj.weight_scale"
    if name in t:
        t[name] = t[name].clone()
        t[name].view(torch.uint8)[0, 0] = 0x7F


def _wrong_dtype(t):
    name = "model.layers.0.mlp.experts.2.up_proj.weight_scale_2"
    if name in t:
        t[name] = t[name].to(torch.bfloat16)


def _missing_expert(t):
    t.pop("model.layers.1.mlp.experts.3.down_proj.weight_scale", None)


def _gate_up_mismatch(t):
    name = "model.layers.0.mlp.experts.1.up_proj.weight_scale_2"
    if name in t:
        t[name] = t[name] * 2


@pytest.mark.parametrize(
    "tensors, quant, expected",
    [
        (_nan_scale, None, "o_proj.weight_scale holds NaN bytes"),
        (_wrong_dtype, None, "experts.2.up_proj.weight_scale_2 must be a float32 scalar, got torch.bfloat16"),
        (_missing_expert, None, "model.layers.1.mlp.experts.3 lacks down_proj.weight_scale"),
        (None, lambda c: c["quantization"].pop("kv_cache_quant_algo"), "quantization.kv_cache_quant_algo is missing"),
        (_gate_up_mismatch, None, "experts.1.{gate_proj,up_proj}.weight_scale_2 differ"),
    ],
    ids=["nan-scale-byte", "wrong-dtype", "missing-expert-tensor", "missing-config-key", "gate-up-mismatch"],
)
def test_verify_catches_each_planted_corruption(exports, tmp_path, tensors, quant, expected):
    _, runs = exports
    broken = _corrupt(runs["tp1"][0], tmp_path / "broken", tensors, quant)
    with pytest.raises(VerificationError, match=".*".join(map(__import__("re").escape, expected.split("{")))):
        verify(broken)


def test_an_interrupted_export_leaves_nothing_that_looks_complete(exports, tmp_path):
    checkpoint, _ = exports
    out = tmp_path / "out"
    report = run_ranks(2, workers.calibrate_and_export, str(checkpoint), str(out), 2, 1, RECIPE, 20)[0]
    assert "simulated failure" in report["error"] and report["written"] == 20
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_inspect_summarizes_and_verifies(exports, tmp_path):
    import subprocess
    import sys

    _, runs = exports
    run = lambda d: subprocess.run([sys.executable, "-m", "dist_quant.cli", "inspect", str(d)], capture_output=True, text=True)  # noqa: E731
    good = run(runs["tp1"][0])
    assert good.returncode == 0 and "NVFP4 weights, KV cache FP8" in good.stdout and "32 quantized modules" in good.stdout
    bad = run(_corrupt(runs["tp1"][0], tmp_path / "broken", _missing_expert))
    assert bad.returncode == 2 and "experts.3 lacks down_proj.weight_scale" in bad.stderr and "Traceback" not in bad.stderr
