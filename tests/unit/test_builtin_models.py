"""The built-in models' configs: each is read whole by the bridge (a key it does not know is refused), holds the
parameters transformers builds from the same file, and the README states its size as the bridge counts it; so
does the README's plan for the full DeepSeek-V3, whose built-in shape differs from it only in its layers."""

import json
import re
from pathlib import Path

import pytest
import torch
import transformers

from dist_quant.bridge import ModelBridge
from dist_quant.bridge.architectures import parameter_counts
from dist_quant.job import BUILTIN_CHECKPOINT_LIMIT, CONFIGS, builtin_models

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
# How the README introduces a built-in model: "`NAME` (30.5B parameters"
README_SIZE = re.compile(r"`([\w.-]+)` \((\d+\.\d)B parameters")
# DeepSeek-V3 as released (config.json of deepseek-ai/DeepSeek-V3): the built-in shape's widths with all its layers
DEEPSEEK_V3_LAYERS = {"num_hidden_layers": 61, "first_k_dense_replace": 3}


def _raw(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def _counted(raw: dict) -> int:
    bridge = ModelBridge.from_hf(raw)
    return sum(parameter_counts(bridge.spec, bridge.config, bridge.forward, bridge.head_dim).values())


def _transformers_count(raw: dict) -> int:
    """The tensors of transformers' model built from the same config (on the meta device: shapes only), as a
    checkpoint saves them (persistent buffers such as e_score_correction_bias included)."""
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**raw))
    return sum(tensor.numel() for tensor in model.state_dict().values())


@pytest.mark.parametrize("name", builtin_models())
def test_builtin_config_is_read_whole_and_holds_transformers_parameters(name):
    raw = _raw(name)
    assert _counted(raw) == _transformers_count(raw)


def test_readme_states_the_size_of_every_builtin_model_that_needs_random_weights():
    stated = {name: float(size) for name, size in README_SIZE.findall(README)}
    assert set(stated) <= set(builtin_models())
    for name in builtin_models():
        counted = _counted(_raw(name))
        if counted > BUILTIN_CHECKPOINT_LIMIT:  # too large to try without --random-weights: the README says so
            assert name in stated, f"README does not introduce {name} as `{name}` (N.NB parameters"
        if name in stated:
            assert stated[name] == round(counted / 1e9, 1), name


def test_deepseek_v3_shape_is_deepseek_v3_but_for_its_layers():
    shape = _raw("deepseek-v3-shape")
    assert (shape["num_hidden_layers"], shape["first_k_dense_replace"]) == (4, 1)  # one dense, three MoE
    assert shape["num_nextn_predict_layers"] == 0  # no multi-token prediction: the bridge leaves it out anyway
    full = {**shape, **DEEPSEEK_V3_LAYERS}
    counted = _counted(full)
    assert counted == _transformers_count(full)
    assert f"{counted / 1e9:.1f}B parameters" in README.split("### DeepSeek-V3 / Kimi-K2")[1]
