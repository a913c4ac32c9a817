"""Invocations that used to start the job (and end in a traceback, or allocate terabytes first) are refused at
startup with one line, `dist-quant: error: ...` and exit status 2, naming the flag, file or key. Run in-process
(`run_cli`): reaching the job itself fails the test."""

import json

import pytest
import torch
from safetensors.torch import save_file

from dist_quant.bridge import ModelBridge
from dist_quant.job import CONFIGS
from tests.e2e.jobs import run_cli

QWEN3 = json.loads((CONFIGS / "tiny-qwen3.json").read_text())
QWEN3_MOE = json.loads((CONFIGS / "tiny-qwen3-moe.json").read_text())


def _refused(*args) -> str:
    result = run_cli("calibrate", "--recipe", "fp8_default-fp8_cast_kv", *args)
    assert result.returncode == 2 and result.stdout == "", result
    assert result.stderr.startswith("dist-quant: error: ") and result.stderr.count("\n") == 1, result.stderr
    return result.stderr.removeprefix("dist-quant: error: ").rstrip("\n")


def _config_only(path, config: dict) -> str:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize(
    "config, expected",
    [
        ({**QWEN3, "num_key_value_heads": 0}, "config.json: num_key_value_heads = 0: expected an integer (query groups) above 0"),
        ({**QWEN3, "num_key_value_heads": 3}, "config.json: num_key_value_heads = 3: expected a divisor of num_attention_heads (4)"),
        ({**QWEN3, "num_key_value_heads": -2}, "config.json: num_key_value_heads = -2: expected an integer (query groups) above 0"),
        ({**QWEN3_MOE, "num_experts_per_tok": 99}, "config.json: num_experts_per_tok = 99: expected at most the 8 routed experts"),
    ],
    ids=["query-groups-0", "query-groups-3", "query-groups-negative", "top-99-of-8-experts"],
)
def test_a_config_value_megatron_cannot_build_is_one_line(tmp_path, config, expected):
    source = _config_only(tmp_path / "model", config)
    assert _refused("--hf-model", source, "--random-weights", "--out", str(tmp_path / "out")).startswith(expected)


@pytest.mark.parametrize("random_weights", [True, False], ids=["random-weights", "checkpoint"])
def test_a_model_no_rank_can_hold_is_refused_before_anything_is_allocated(tmp_path, random_weights):
    # 2^34 x 1024 float32 parameters, in the embedding and again in the head: 141 TB
    source = _config_only(tmp_path / "model", {**QWEN3, "vocab_size": 2**34, "hidden_size": 1024})
    message = _refused("--hf-model", source, "--out", str(tmp_path / "out"), *["--random-weights"] * random_weights)
    assert message.startswith(
        f"--hf-model {source}: config.json describes 35,184.4B parameters (17,592.2B of them in model.embed_tokens.weight), "
        "140,737 GB in float32, all on one rank, more than "
    ), message


def test_a_width_tp_cannot_split_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # validate() as rank 0 of two sees it
    source = _config_only(tmp_path / "model", {**QWEN3, "vocab_size": 511})
    message = _refused("--hf-model", source, "--random-weights", "--tp", "2", "--out", str(tmp_path / "out"))
    assert message == "vocab_size=511 is not divisible by TP=2"


@pytest.mark.parametrize(
    "dtype, shown", [(torch.uint32, "U32"), (torch.float8_e4m3fn, "torch.float8_e4m3fn"), (torch.float64, "torch.float64")],
    ids=["U32", "F8_E4M3", "F64"],
)
def test_a_source_tensor_of_a_dtype_not_read_is_refused_at_startup_naming_it_and_its_file(tmp_path, dtype, shown):
    source = tmp_path / "model"
    _config_only(source, QWEN3)
    tensors = {name: torch.zeros(shape) for name, shape in ModelBridge.from_hf(QWEN3).hf_tensor_shapes().items()}
    tensors["model.layers.1.mlp.down_proj.weight"] = tensors["model.layers.1.mlp.down_proj.weight"].to(dtype)
    save_file(tensors, source / "model.safetensors")
    message = _refused("--hf-model", str(source), "--out", str(tmp_path / "out"))
    assert message.startswith(
        f"{source / 'model.safetensors'}: model.layers.1.mlp.down_proj.weight: {shown}, not a dtype dist_quant reads"
    ), message


@pytest.mark.parametrize("minutes", ["inf", "1e12", "10081"])
def test_a_timeout_beyond_a_week_is_one_line(tmp_path, minutes):
    message = _refused("--model", "tiny-qwen3", "--timeout", minutes, "--out", str(tmp_path / "out"))
    assert message == f"--timeout must be a positive number of minutes, at most 10080 (a week), not {float(minutes):g}"


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_a_seed_megatron_cannot_offset_per_rank_is_one_line(tmp_path, seed):
    message = _refused("--model", "tiny-qwen3", "--seed", seed, "--out", str(tmp_path / "out"))
    assert message == f"--seed must be a number from 0 to 2^32 - 1, not {seed}"


@pytest.mark.parametrize("below", [False, True], ids=["the-file", "below-the-file"])
def test_a_cache_that_is_a_file_is_one_line(tmp_path, monkeypatch, below):
    blocking = tmp_path / "cache"
    blocking.write_text("not a directory")
    cache = blocking / "models" if below else blocking
    monkeypatch.setenv("DIST_QUANT_CACHE", str(cache))
    message = _refused("--model", "tiny-qwen3", "--out", str(tmp_path / "out"))
    assert message == (
        f"{cache}: cannot make the cache of built-in models there (a file is in the way); set DIST_QUANT_CACHE to a "
        "directory of your own"
    )
