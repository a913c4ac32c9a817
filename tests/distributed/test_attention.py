"""The core attention of the models the bridge builds (`SdpaDotProductAttention`): torch's fused attention where
it computes megatron's local attention, the same logits as that (to float32 rounding) at TP1 and TP2, GQA
included, quantized K/V included; megatron's own forward, run and chunked as before, for masks it cannot
recognize as causal, dropout in training and cross-attention."""

import pytest
import torch

from dist_quant.parallel.spawn import run_ranks
from tests.distributed import attention_workers, workers
from tests.distributed.workers import fitting

LAYOUTS = fitting({"tp1": (1,), "tp2": (2,)})  # world = TP


@pytest.mark.parametrize("model", ["tiny-qwen3", "tiny-qwen3-moe"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fused_attention_computes_megatrons_local_attention(model, layout):
    (tp,) = LAYOUTS[layout]
    for report in run_ranks(tp, attention_workers.fused_and_local_case, model, tp, backend=workers.BACKEND):
        assert report["classes"] == ["SdpaDotProductAttention"]
        layers = 2
        for label in ("plain", "quantized"):
            own, local_calls = report[f"{label}, own"]
            assert local_calls == layers * (attention_workers.BATCH if label == "quantized" else 1)  # chunked
            for mask in ("marked", "none"):
                fused, calls = report[f"{label}, {mask}"]
                assert calls == 0
                torch.testing.assert_close(fused, own, rtol=1e-5, atol=1e-5)
            assert torch.equal(report[f"{label}, marked"][0], report[f"{label}, none"][0])
        # the quantizers change the logits: the comparison above saw them
        assert not torch.allclose(report["plain, marked"][0], report["quantized, marked"][0], atol=1e-3)
        assert report["fused"] == {
            "marked": True, "none": True, "own": False, "marked, then written": False, "cross-attention": False,
            "dropout in training": False, "training without dropout": True,
        }
