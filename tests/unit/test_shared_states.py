"""Shared quant states: sibling NVFP4 quantizers end with one global amax, the max over the group."""

import copy

import pytest
import torch
from torch import nn

from dist_quant import load_recipe, quantize
from dist_quant.calibrate import attach_quantizers, promote
from dist_quant.calibrate.shared import form_shared_states
from dist_quant.modules.shared import SharedQuantState
from dist_quant.numerics import nvfp4_fake_quant
from dist_quant.parallel.groups import ParallelGroups
from dist_quant.recipe import RecipeError
from tests.reference.hf import tiny_qwen3

NVFP4 = {"num_bits": "e2m1", "block_sizes": {-1: 16}}
H = 32


def _gated(names=("gate_proj", "up_proj", "down_proj")):
    block = nn.Module()
    for name in names:
        setattr(block, name, nn.Linear(H, H, bias=False))
    return block


class Layer(nn.Module):
    """HF-named attention, dense gated MLP, Qwen-style and Mixtral-style experts, and a shared-expert gate."""

    def __init__(self):
        super().__init__()
        self.self_attn = _gated(("q_proj", "k_proj", "v_proj", "o_proj"))
        self.mlp = _gated()
        self.mlp.experts = nn.ModuleList([_gated() for _ in range(3)])
        self.mlp.shared_expert_gate = nn.Linear(H, 1, bias=False)
        self.moe = nn.Module()
        self.moe.experts = nn.ModuleList([_gated(("w1", "w2", "w3")) for _ in range(2)])
        with torch.no_grad():  # distinct magnitudes, so "the max of the group" is not everyone's value
            for i, linear in enumerate(m for m in self.modules() if isinstance(m, nn.Linear)):
                linear.weight.mul_(1 + 0.37 * i)

    def forward(self, x):
        for linear in (m for m in self.modules() if isinstance(m, nn.Linear)):
            linear(x)


class Model(nn.Module):
    """`model.layers.0.…`, as Hugging Face names them."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([Layer()])

    def forward(self, x):
        self.model.layers[0](x)


def _quantized(gen, shared_patterns=None):
    torch.manual_seed(gen.initial_seed())
    root = Model()
    algorithm = {"method": "max"} if shared_patterns is None else {"shared_patterns": shared_patterns}
    recipe = {"quantize": {"algorithm": algorithm, "quant_cfg": [
        {"quantizer_name": "*weight_quantizer", "cfg": NVFP4},
        {"quantizer_name": "*input_quantizer", "cfg": NVFP4},
    ]}}
    data = [torch.randn(4, H, generator=gen) for _ in range(2)]
    quantize(root, recipe, lambda m: [m(x) for x in data])
    return root.model.layers[0], recipe


def _global(module):
    return module.weight_quantizer.global_amax


def _own(module):
    return module.weight_quantizer._amax


def test_siblings_share_the_max_and_others_stay_alone(gen):
    layer, _ = _quantized(gen)
    attn, mlp = layer.self_attn, layer.mlp
    qkv = max(_own(attn.q_proj), _own(attn.k_proj), _own(attn.v_proj))
    assert all(torch.equal(_global(m), qkv) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
    assert qkv > min(_own(attn.q_proj), _own(attn.k_proj), _own(attn.v_proj))
    for alone in (attn.o_proj, mlp.down_proj, mlp.shared_expert_gate, layer.moe.experts[0].w2):
        assert alone.weight_quantizer._global_amax is None and alone.weight_quantizer.shared_state is None
    pairs = [(mlp.gate_proj, mlp.up_proj)] + [(e.gate_proj, e.up_proj) for e in mlp.experts]
    pairs += [(e.w1, e.w3) for e in layer.moe.experts]
    values = []
    for a, b in pairs:
        expected = torch.maximum(_own(a), _own(b))
        assert torch.equal(_global(a), expected) and torch.equal(_global(b), expected)
        values.append(expected.item())
    assert len(set(values)) == len(values)  # never across experts
    # The shared value drives the fake quant, block scales included.
    w = attn.k_proj.weight
    assert torch.equal(attn.k_proj.weight_quantizer(w), nvfp4_fake_quant(w, qkv))


def test_states_hang_off_the_parent_and_are_not_saved(gen):
    layer, _ = _quantized(gen)
    state = layer.self_attn.shared_weight_state
    prefix = "model.layers.0.self_attn."
    assert isinstance(state, SharedQuantState) and state.members == [prefix + p for p in ("q_proj", "k_proj", "v_proj")]
    assert layer.self_attn.q_proj.weight_quantizer.shared_state is state
    assert isinstance(layer.mlp.experts[1].shared_input_state, SharedQuantState)
    keys = layer.state_dict().keys()  # of the layer: names relative to it
    assert not any("_state." in k for k in keys) and "self_attn.q_proj.weight_quantizer._global_amax" in keys


def test_restore_into_a_fresh_model_strictly(gen):
    layer, recipe = _quantized(gen)
    fresh = Model()
    attach_quantizers(fresh, load_recipe(recipe))
    fresh = fresh.model.layers[0]
    fresh.load_state_dict(layer.state_dict(), strict=True)
    promote(fresh)
    x = torch.randn(4, H, generator=gen)
    for name, module in layer.named_modules():
        if isinstance(module, nn.Linear):
            restored = fresh.get_submodule(name)
            assert torch.equal(restored(x), module(x)), name
            assert torch.equal(restored.weight_quantizer.global_amax, module.weight_quantizer.global_amax)


def test_empty_weight_patterns_turn_weight_grouping_off(gen):
    layer, _ = _quantized(gen, shared_patterns={"weight": []})
    assert all(m.weight_quantizer._global_amax is None for m in layer.modules() if isinstance(m, nn.Linear))
    assert isinstance(layer.self_attn.shared_input_state, SharedQuantState)  # inputs keep the built-ins


def test_a_pattern_can_group_across_experts_and_a_lone_match_stays_alone(gen):
    across = r"(.*\.mlp\.experts)\.\d+\.up_proj\.weight_quantizer"
    layer, _ = _quantized(gen, shared_patterns={"weight": [across, r"(.*)\.o_proj\.weight_quantizer"]})
    ups = [e.up_proj for e in layer.mlp.experts]
    top = max(_own(m) for m in ups)
    assert all(torch.equal(_global(m), top) for m in ups)
    assert len(layer.mlp.experts) == 3 and isinstance(layer.mlp.shared_weight_state, SharedQuantState)
    assert layer.self_attn.o_proj.weight_quantizer._global_amax is None
    assert layer.mlp.experts[0].gate_proj.weight_quantizer._global_amax is None


def test_a_state_from_another_model_is_not_trusted(gen):
    layer, recipe = _quantized(gen)
    other = copy.deepcopy(layer)
    foreign = other.self_attn.shared_weight_state
    foreign.global_amax.fill_(123.0)
    q = layer.self_attn.q_proj.weight_quantizer
    q.__dict__["shared_state"] = foreign
    q._global_amax = foreign.global_amax.clone()
    form_shared_states(layer, load_recipe(recipe).algorithm, ParallelGroups())
    assert q.shared_state is layer.self_attn.shared_weight_state and q.global_amax < 123.0


def test_real_qwen3_attention_and_mlp_siblings(gen):
    model = tiny_qwen3(gen)
    tokens = torch.randint(0, 128, (2, 8), generator=gen)
    quantize(model, "nvfp4_default-fp8_cast_kv", lambda m: m(tokens))
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert torch.equal(_global(attn.q_proj), _global(attn.v_proj)) and torch.equal(_global(mlp.gate_proj), _global(mlp.up_proj))
    assert attn.o_proj.weight_quantizer._global_amax is None


def test_invalid_patterns_fail_at_load():
    with pytest.raises(RecipeError, match="does not compile"):
        load_recipe({"quantize": {"algorithm": {"shared_patterns": {"weight": ["(q|k"]}}, "quant_cfg": [{"quantizer_name": "*", "enable": False}]}})
