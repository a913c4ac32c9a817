"""The bridge on real gloo groups: tiny random Llama, Qwen3 and Qwen3-MoE checkpoints written by transformers are
loaded into sharded megatron-core models (each rank reading only its slices) and streamed back out."""

import pytest
import torch

from dist_quant.parallel.spawn import run_ranks
from tests.distributed import bridge_workers as workers
from tests.reference.tolerance import assert_equal_up_to_rounding, transformer_roundings

pytestmark = pytest.mark.xdist_group("bridge")  # one worker computes the module's fixtures

LAYOUTS = {"tp1": (1, 1, 1), "tp2": (2, 2, 1), "ep2": (2, 1, 2), "tp2xep2": (4, 2, 2)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """arch -> (checkpoint directory, its tensors, HF logits on the probe tokens)."""
    return workers.write_checkpoints(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def exported(checkpoints):
    paths = {arch: str(path) for arch, (path, _, _) in checkpoints.items()}
    return {name: run_ranks(world, workers.round_trip, paths, tp, ep)[0] for name, (world, tp, ep) in LAYOUTS.items()}


@pytest.mark.parametrize("arch", workers.ARCHS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_hf_to_megatron_to_hf_is_bit_exact(checkpoints, exported, layout, arch):
    _, saved, _ = checkpoints[arch]
    out = exported[layout][arch]["tensors"]
    assert out.keys() == saved.keys()
    differing = [name for name in saved if not torch.equal(out[name], saved[name])]
    assert not differing, differing[:5]


@pytest.mark.parametrize("arch", workers.ARCHS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_megatron_logits_equal_the_transformers_model(checkpoints, exported, layout, arch):
    _, _, expected = checkpoints[arch]
    roundings = transformer_roundings(workers.hf_config(arch)[0].to_dict(), workers.SEQ)
    assert_equal_up_to_rounding(exported[layout][arch]["logits"], expected, roundings)


def test_broken_checkpoints_are_one_line_errors_naming_the_tensor_or_file(checkpoints, tmp_path):
    path, saved, _ = checkpoints["llama"]
    messages = run_ranks(1, workers.load_errors, str(path), str(tmp_path))[0]
    expected = {
        "extra": "the checkpoint holds model.layers.0.mlp.extra.weight, which config.json does not describe",
        "shape": "model.layers.1.self_attn.o_proj.weight: shape (64, 32), config.json describes (64, 64)",
        "missing": "the checkpoint lacks model.norm.weight, which config.json describes",
        "int32": "model.layers.0.input_layernorm.weight: torch.int32, not a dtype dist_quant reads",
        "outside-index": "points outside the checkpoint directory ('../outside.safetensors')",
        "garbage-file": "model.safetensors: not a readable safetensors file",
    }
    assert messages.keys() == expected.keys()
    for case, text in expected.items():
        assert text in messages[case] and "\n" not in messages[case], (case, messages[case])


def test_nan_on_one_pipeline_stage_stops_every_rank_naming_it(checkpoints):
    path = str(checkpoints["qwen3"][0])
    for message in run_ranks(2, workers.pipeline_nan_case, path):
        assert "NaN or Inf" in message and "decoder.layers.1.self_attention.linear_proj.input_quantizer" in message, message
        assert "(on rank 1)" in message
