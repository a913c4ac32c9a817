"""One NVFP4 input scale for all experts of an MoE layer (recipe `algorithm.expert_inputs: shared`): what vLLM's
FlashInfer MoE backends and SGLang use (the max over a layer's experts), so that QAT trains with what the engine
runs; the default keeps each expert's own."""

import pytest

from dist_quant import load_recipe
from dist_quant.parallel.spawn import run_ranks
from dist_quant.recipe import RecipeError
from tests.distributed import bridge_workers as workers
from tests.distributed import workers as distributed_workers
from tests.distributed.workers import fitting

pytestmark = pytest.mark.xdist_group("expert-inputs")  # one worker computes the module's fixtures


@pytest.fixture(scope="module")
def scales(tmp_path_factory):
    checkpoint = workers.write_checkpoints(tmp_path_factory.mktemp("expert-inputs"), ("qwen3_moe",))["qwen3_moe"][0]
    world = 2 if fitting({"ep2": (2,)}) else 1
    return run_ranks(world, workers.expert_input_scales, str(checkpoint), world)[0]


def _by_layer_and_linear(scales: dict[str, float]) -> dict[tuple[str, str], dict[str, float]]:
    grouped = {}
    for name, value in scales.items():
        layer, _, rest = name.partition(".mlp.experts.")
        expert, projection = rest.split(".")[:2]
        grouped.setdefault((layer, "down" if projection == "down_proj" else "gate/up"), {})[f"{expert}.{projection}"] = value
    return grouped


def test_shared_expert_inputs_take_the_max_over_the_layers_experts_on_every_rank(scales):
    own, shared = _by_layer_and_linear(scales["per_expert"]), _by_layer_and_linear(scales["shared"])
    assert own.keys() == shared.keys() and len(own) == 4  # 2 layers x (fc1, fc2)
    for key, values in shared.items():
        assert set(values.values()) == {max(own[key].values())}, key
        assert len(set(own[key].values())) > 1, key  # per expert, they differ: the option changed something


def test_shared_expert_inputs_need_nvfp4_inputs():
    from dataclasses import replace

    recipe = load_recipe("fp8_default-fp8_cast_kv")
    recipe = replace(recipe, algorithm=replace(recipe.algorithm, expert_inputs="shared"))
    message = run_ranks(1, distributed_workers.attach_error, recipe)[0]
    assert "algorithm.expert_inputs: shared gives NVFP4 expert inputs one global amax" in message
    assert "local_experts.0.linear_fc1.input_quantizer is fp8" in message
    with pytest.raises(RecipeError, match="algorithm.expert_inputs: 'sometimes' is not one of"):
        load_recipe({"quantize": {"algorithm": {"expert_inputs": "sometimes"}, "quant_cfg": [{"quantizer_name": "*", "enable": False}]}})
