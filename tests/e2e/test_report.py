"""--report: every quantizer and quantized weight of the model, gathered from every rank, the same whether the
model ran on one rank or sharded (TP 2, experts split over EP 2)."""

import json

import torch

from dist_quant.report import JSON_FILE, PNG_FILE
from tests.e2e.jobs import calibrate_on_ranks, tiny_qwen3_moe
from tests.reference.tolerance import rounding_tolerance


def _summary_counts(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if "quantizers in the model by kind and format" in line) + 1
    return [line for line in lines[start:] if line.startswith("      ")]


def test_the_report_of_a_sharded_run_is_the_single_ranks(tmp_path):
    source = tiny_qwen3_moe(tmp_path / "source", torch.float32)
    common = ("--hf-model", str(source), "--recipe", "nvfp4_default-fp8_cast_kv", "--calib-samples", "4", "--seq-len", "16")
    single = calibrate_on_ranks(1, *common, "--out", str(tmp_path / "one"), "--report", str(tmp_path / "report-one"))
    sharded = calibrate_on_ranks(2, *common, "--tp", "2", "--ep", "2", "--etp", "1", "--out", str(tmp_path / "two"),
                                 "--report", str(tmp_path / "report-two"))
    assert single.returncode == 0 and sharded.returncode == 0, sharded.stderr[-3000:]
    one, two = (json.loads((tmp_path / name / JSON_FILE).read_text()) for name in ("report-one", "report-two"))
    assert (tmp_path / "report-two" / PNG_FILE).is_file()
    assert f"report: {tmp_path / 'report-two' / JSON_FILE}, {tmp_path / 'report-two' / PNG_FILE}" in sharded.stdout
    assert "worst weight errors (relative MSE): model.layers." in sharded.stdout
    # every expert of every layer, though each rank holds half of them; TP shards combined into one entry each
    weights = {w["megatron_name"]: w for w in one["weights"]}
    assert {w["megatron_name"] for w in two["weights"]} == set(weights)
    experts = {name for name in weights if ".local_experts." in name}
    assert len(experts) == 2 * 4 * 2  # layers x experts x (fc1, fc2)
    assert weights["decoder.layers.1.mlp.experts.local_experts.3.linear_fc1"]["hf_names"] == [
        "model.layers.1.mlp.experts.3.gate_proj", "model.layers.1.mlp.experts.3.up_proj"]
    for entry in two["weights"]:
        expected = weights[entry["megatron_name"]]["relative_mse"]
        # the same squares in float64, summed in two pieces instead of one (at most 8192 of them: qkv's)
        assert abs(entry["relative_mse"] - expected) <= rounding_tolerance(expected, 2 * 8192, torch.float64), entry
    quantizers = {q["megatron_name"]: q for q in one["quantizers"]}
    assert {q["megatron_name"] for q in two["quantizers"]} == set(quantizers)
    for entry in two["quantizers"]:
        assert entry["amax"] is not None and entry["amax"] > 0, entry
        if entry["role"] == "weight":  # a maximum of the same weights: exact
            assert entry["amax"] == quantizers[entry["megatron_name"]]["amax"], entry
    # the summary counts the model's quantizers once each, not one rank's
    assert _summary_counts(sharded.stdout) == _summary_counts(single.stdout)
    assert "on 2 ranks" in sharded.stdout and "on 1 rank," in single.stdout
