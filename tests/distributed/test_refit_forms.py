"""The refit's forms for engines, against the plain stream and an independent quantization: every rank's own
share packed into buckets reassembles, byte for byte, into the stream gathered to rank 0; the quantized stream
holds, for every quantized module, exactly what the independent reference makes of the plain stream's weight and
quantizer state (what the per-tensor exporter wrote)."""

import pytest
import torch

from dist_quant.parallel.spawn import run_ranks
from tests.distributed import bridge_workers as workers
from tests.distributed.workers import fitting
from tests.reference import formats as ref

pytestmark = pytest.mark.xdist_group("refit-forms")  # one worker computes the module's fixtures
# name -> (world, TP, EP, PP, recipe)
LAYOUTS = fitting({
    "tp2xep2": (4, 2, 2, 1, workers.w4a4_mse_recipe()),
    "pp2xep2": (4, 1, 2, 2, "nvfp4_default-fp8_kv"),
})


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    checkpoint = workers.write_checkpoints(tmp_path_factory.mktemp("refit-forms"), ("qwen3_moe",))["qwen3_moe"][0]
    return {
        layout: run_ranks(world, workers.refit_forms, str(checkpoint), tp, ep, pp, recipe)
        for layout, (world, tp, ep, pp, recipe) in LAYOUTS.items()
    }


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("quantized", [False, True], ids=["weights", "quantized"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_ranks_buckets_reassemble_into_the_stream(forms, layout, quantized):
    ranks = [rank[quantized] for rank in forms[layout]]
    stream = dict(ranks[0]["stream"])
    assert len(stream) == len(ranks[0]["stream"])  # no name twice
    pieces: dict[str, torch.Tensor] = {}
    for rank in ranks:
        for bucket in rank["buckets"]:
            assert not pieces.keys() & bucket.keys()  # every tensor comes from exactly one rank, once
            pieces |= bucket
    assert pieces.keys() == stream.keys()
    assert all(_same_bytes(pieces[name], tensor) for name, tensor in stream.items())
    assert sum(len(rank["buckets"]) > 1 for rank in ranks) >= 2  # the share of several ranks, in several buckets
    for rank in ranks:  # only a bucket of one tensor exceeds the bucket size
        assert all(size <= 4096 or len(bucket) == 1 for size, bucket in zip(rank["bucket_bytes"], rank["buckets"]))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_quantized_stream_is_the_reference_quantization_of_the_plain_stream(forms, layout):
    plain, quantized = dict(forms[layout][0][False]["stream"]), dict(forms[layout][0][True]["stream"])
    modules = [name[: -len(".weight_scale_2")] for name in quantized if name.endswith(".weight_scale_2")]
    assert any(".experts." in m for m in modules) and any("q_proj" in m for m in modules)
    for module in modules:
        state = f"{module}.weight_quantizer"
        amax = plain.get(f"{state}._global_amax", plain[f"{state}._amax"])
        block_amax = plain.get(f"{state}._block_amax")
        expected = ref.nvfp4(plain[f"{module}.weight"], amax, block_amax)
        assert torch.equal(quantized[f"{module}.weight"], ref.pack_codes(expected["codes"])), module
        assert torch.equal(quantized[f"{module}.weight_scale"].view(torch.uint8), expected["scale_codes"].to(torch.uint8)), module
        ref.assert_same_bits(quantized[f"{module}.weight_scale_2"], expected["scale_2"])
        input_amax = plain.get(f"{module}.input_quantizer._global_amax", plain[f"{module}.input_quantizer._amax"])
        ref.assert_same_bits(quantized[f"{module}.input_scale"], input_amax / torch.tensor(2688.0))
    static = any(name.endswith("_block_amax") for name in plain)
    assert static == (layout == "tp2xep2")  # both kinds of block amax are covered
