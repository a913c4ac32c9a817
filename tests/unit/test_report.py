"""The calibration report from every rank's quantization: merged (shards summed, each quantizer once), named by
the bridge's Hugging Face names, written as JSON and PNG (or JSON and one line without matplotlib)."""

import json
import sys

import pytest

from dist_quant import report
from dist_quant.bridge import ModelBridge
from dist_quant.job import CONFIGS, merged_quantization, weight_error_by_type

QKV = "decoder.layers.0.self_attention.linear_qkv"
EXPERT = "decoder.layers.1.mlp.experts.local_experts.3.linear_fc2"
# Two TP ranks: each holds half of the qkv weight (its own error sums) and the same synced amax; rank 1 alone
# holds the expert (EP); the output quantizer has no checkpoint name.
RANKS = [
    {
        "quantizers": {f"{QKV}.weight_quantizer": ("weight", "nvfp4 block16"), "output_layer.output_quantizer": ("output", "fp8")},
        "amax": {f"{QKV}.weight_quantizer": 0.5, "output_layer.output_quantizer": 3.0},
        "errors": {QKV: (1.0, 100.0)},
    },
    {
        "quantizers": {f"{QKV}.weight_quantizer": ("weight", "nvfp4 block16"), f"{EXPERT}.input_quantizer": ("input", "nvfp4 block16")},
        "amax": {f"{QKV}.weight_quantizer": 0.5, f"{EXPERT}.input_quantizer": None},
        "errors": {QKV: (3.0, 100.0), EXPERT: (2.0, 10.0)},
    },
]


@pytest.fixture(scope="module")
def built():
    registry = ModelBridge.from_hf(CONFIGS / "tiny-qwen3-moe.json").registry(quant_state=True)
    return report.build(merged_quantization(RANKS), registry, {"model": "tiny-qwen3-moe"})


def test_shards_add_up_and_each_quantizer_counts_once():
    merged = merged_quantization(RANKS)
    assert len(merged["quantizers"]) == 3 and merged["errors"][QKV] == [4.0, 200.0]
    assert weight_error_by_type(merged["errors"]) == {"attention qkv": 0.02, "experts fc2": 0.2}


def test_entries_carry_hugging_face_names_where_the_bridge_has_them(built):
    weights = {w["megatron_name"]: w for w in built["weights"]}
    assert weights[QKV]["hf_names"] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert weights[QKV]["relative_mse"] == 0.02 and weights[QKV]["layer"] == 0 and weights[QKV]["type"] == "attention qkv"
    assert weights[EXPERT]["hf_names"] == ["model.layers.1.mlp.experts.3.down_proj"] and weights[EXPERT]["relative_mse"] == 0.2
    quantizers = {q["megatron_name"]: q for q in built["quantizers"]}
    assert quantizers["output_layer.output_quantizer"]["hf_names"] == []  # no checkpoint name: the Megatron one
    assert quantizers["output_layer.output_quantizer"]["layer"] is None
    assert quantizers[f"{EXPERT}.input_quantizer"]["hf_names"] == ["model.layers.1.mlp.experts.3.down_proj.input_quantizer"]
    assert report.shown_name(weights[QKV]) == "model.layers.0.self_attn.{q_proj,k_proj,v_proj}"


def test_json_and_png_are_written_and_the_worst_weights_named(tmp_path, built):
    pytest.importorskip("matplotlib")
    lines = report.write(tmp_path / "report", built)
    assert json.loads((tmp_path / "report" / report.JSON_FILE).read_text()) == built
    assert (tmp_path / "report" / report.PNG_FILE).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert lines[0] == f"report: {tmp_path / 'report' / report.JSON_FILE}, {tmp_path / 'report' / report.PNG_FILE}"
    assert lines[1].startswith("worst weight errors (relative MSE): model.layers.1.mlp.experts.3.down_proj 2.000e-01, ")


def test_without_matplotlib_the_json_is_written_and_one_line_says_how_to_get_the_png(tmp_path, built, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # an import of it fails, as where it is not installed
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    lines = report.write(tmp_path, built)
    assert (tmp_path / report.JSON_FILE).is_file() and not (tmp_path / report.PNG_FILE).exists()
    assert lines[0] == f"report: {tmp_path / report.JSON_FILE} (the PNG needs matplotlib: pip install 'dist_quant[report]')"
