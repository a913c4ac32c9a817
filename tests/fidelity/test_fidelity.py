"""Fidelity against transformers: checkpoints made by transformers, calibrated through the bridge at TP1 and at a
sharded layout (TP2 x DP2 for dense models, TP2 x EP2 for MoE, on 4 gloo ranks), must see exactly the activations
transformers computes: every activation amax (the input of every quantized linear, per expert; K and V after q/k
norm and rope) equals the max |activation| of transformers' forward on the same tokens. Layout invariance alone
would not catch a rope or routing semantics both layouts get wrong."""

import pytest
import torch

from dist_quant.parallel.spawn import run_ranks
from tests.distributed.workers import BACKEND, fitting
from tests.fidelity import oracle
from tests.fidelity import workers
from tests.reference.tolerance import assert_equal_up_to_rounding, transformer_roundings

pytestmark = pytest.mark.xdist_group("fidelity")

# name -> (world, TP, EP, PP): dense models run data-parallel where EP would be (TP2 x DP2, PP2 x DP2); layers
# that do not split evenly over the stages put the remainder on the first
LAYOUTS = fitting({"tp1": (1, 1, 1, 1), "tp2-ep2": (4, 2, 2, 1), "pp2": (2, 1, 1, 2), "pp2-tp2": (4, 2, 1, 2), "pp2-ep2": (4, 1, 2, 2)})


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """case -> (checkpoint path, transformers' activation amax by HF quantizer name, transformers' logits)."""
    root = tmp_path_factory.mktemp("fidelity")
    out = {}
    for case in oracle.CASES:
        path = oracle.write_checkpoint(case, root)
        out[case] = (path, *oracle.activation_amax(path, case))
    return out


@pytest.fixture(scope="module")
def calibrated(references):
    paths = {case: str(path) for case, (path, _, _) in references.items()}
    return {
        layout: run_ranks(world, workers.calibrate_cases, paths, tp, ep, pp, backend=BACKEND)[0]
        for layout, (world, tp, ep, pp) in LAYOUTS.items()
    }


def _roundings(case: str) -> int:
    return transformer_roundings(oracle.CASES[case][1], oracle.SEQ)


def _tied(case: str) -> bool:
    return oracle.CASES[case][1]["tie_word_embeddings"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", oracle.CASES)
def test_every_activation_amax_equals_transformers(references, calibrated, case, layout):
    _, expected, _ = references[case]
    if _tied(case):  # a head tied to the embedding is not quantized (the recipe must leave it alone)
        expected = {k: v for k, v in expected.items() if not k.startswith("lm_head.")}
    got = calibrated[layout][case]["amax"]
    assert got.keys() == expected.keys(), (sorted(got.keys() - expected.keys())[:5], sorted(expected.keys() - got.keys())[:5])
    off = {k: (got[k], expected[k]) for k in expected if abs(got[k] - expected[k]) > 1e-5 * abs(expected[k])}
    assert not off, f"{len(off)} of {len(expected)} differ, e.g. {dict(list(off.items())[:4])}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", oracle.CASES)
def test_megatron_forward_equals_transformers(references, calibrated, case, layout):
    _, _, expected = references[case]
    assert_equal_up_to_rounding(calibrated[layout][case]["plain_logits"], expected, _roundings(case))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", oracle.MOE_CASES)
def test_routing_weight_after_fc2_leaves_the_moe_output_alone(calibrated, case, layout):
    """Quantizers attached (routing weight moved after linear_fc2) but disabled: megatron's own output, to
    float rounding."""
    run = calibrated[layout][case]
    assert_equal_up_to_rounding(run["disabled_logits"], run["plain_logits"], _roundings(case))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", [case for case in oracle.CASES if _tied(case)])
def test_a_head_tied_to_the_embedding_is_not_quantized_silently(calibrated, case, layout):
    message = calibrated[layout][case]["tied_head_error"]
    assert message is not None and "output_layer.*: this layer shares the embedding's weight" in message


@pytest.mark.parametrize("case", oracle.CASES)
def test_the_bridge_knows_every_tensor_of_the_checkpoint_and_its_shape(references, case):
    from safetensors import safe_open

    from dist_quant.bridge import ModelBridge

    path = references[case][0]
    with safe_open(path / "model.safetensors", "pt") as f:
        stored = {name: torch.Size(f.get_slice(name).get_shape()) for name in f.keys()}
    assert ModelBridge.from_hf(path, seq_len=oracle.SEQ).hf_tensor_shapes() == stored


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", oracle.CASES)
def test_hf_to_megatron_to_hf_is_bit_exact(references, calibrated, case, layout):
    from safetensors.torch import load_file

    saved = load_file(references[case][0] / "model.safetensors")
    out = calibrated[layout][case]["round_trip"]
    assert out.keys() == saved.keys()
    differing = [name for name in saved if not (out[name].dtype == saved[name].dtype and torch.equal(out[name], saved[name]))]
    assert not differing, differing[:5]
