"""Bridge mappings in one process: tensor layouts and derived quantizer-state mappings against docs/mappings.md,
name lookups, and clear errors."""

import pytest
import torch

from dist_quant.bridge import BridgeError, MappingRegistry, ModelBridge
from dist_quant.bridge.io import StateDictReader
from dist_quant.bridge.mappings import (
    AmaxMapping,
    ConcatenatedQKVMapping,
    GatedMLPMapping,
    Mapping,
    QKVMapping,
    RowParallelMapping,
    ShardInfo,
    kv_bmm_mappings,
)

NP, NG, D, H = 8, 2, 4, 6  # query heads, groups, head dim, hidden
QKV = QKVMapping(
    "decoder.layers.*.self_attention.linear_qkv.weight",
    tuple(f"model.layers.*.self_attn.{p}_proj.weight" for p in "qkv"),
    num_heads=NP, num_groups=NG, head_dim=D,
)


def _qkv(gen):
    return [torch.randn(rows, H, generator=gen) for rows in (NP * D, NG * D, NG * D)]


def test_fused_qkv_rows_follow_the_spec_formula(gen):
    q, k, v = _qkv(gen)
    fused = QKV.to_megatron([q, k, v])
    hpg = NP // NG
    for r in range(fused.shape[0]):  # docs/mappings.md, written out
        b = r // D
        g, s = b // (hpg + 2), b % (hpg + 2)
        expected = q[(g * hpg + s) * D + r % D] if s < hpg else (k if s == hpg else v)[g * D + r % D]
        assert torch.equal(fused[r], expected), r
    assert all(torch.equal(a, b) for a, b in zip(QKV.to_hf(fused), (q, k, v)))


@pytest.mark.parametrize("tp", [1, 2])
def test_tp_ranks_read_whole_query_groups(gen, tp):
    q, k, v = _qkv(gen)
    reader = StateDictReader(dict(zip(QKV.hf_names(("0",)), (q, k, v))))
    full = QKV.to_megatron([q, k, v])
    pieces = [QKV.load(reader, QKV.hf_names(("0",)), ShardInfo(tp_rank=r, tp_size=tp)) for r in range(tp)]
    assert torch.equal(torch.cat(pieces), full)  # contiguous: ng / tp whole groups per rank
    with pytest.raises(BridgeError, match="2 query groups do not split over TP=4"):
        QKV.load(reader, QKV.hf_names(("0",)), ShardInfo(tp_rank=0, tp_size=4))


def test_gated_fc1_rank_holds_its_gate_and_up_rows(gen):
    gated = GatedMLPMapping("l.*.linear_fc1.weight", ("l.*.gate_proj.weight", "l.*.up_proj.weight"))
    gate, up = torch.randn(8, H, generator=gen), torch.randn(8, H, generator=gen)
    reader = StateDictReader({"l.0.gate_proj.weight": gate, "l.0.up_proj.weight": up})
    piece = gated.load(reader, gated.hf_names(("0",)), ShardInfo(tp_rank=1, tp_size=2))
    assert torch.equal(piece, torch.cat([gate[4:], up[4:]]))
    assert [torch.equal(a, b) for a, b in zip(gated.to_hf(torch.cat([gate, up])), (gate, up))] == [True, True]


def test_row_parallel_split_must_divide(gen):
    row = RowParallelMapping("a.*.linear_proj.weight", "a.*.o_proj.weight")
    reader = StateDictReader({"a.0.o_proj.weight": torch.randn(4, 6, generator=gen)})
    assert row.load(reader, ["a.0.o_proj.weight"], ShardInfo(tp_rank=1, tp_size=2)).shape == (4, 3)
    with pytest.raises(BridgeError, match="dim 1 of size 6 does not split 4 ways"):
        row.load(reader, ["a.0.o_proj.weight"], ShardInfo(tp_rank=0, tp_size=4))


def test_expert_numbers_are_global_on_the_hf_side():
    expert = RowParallelMapping("d.*.local_experts.*.linear_fc2.weight", "m.*.experts.*.down_proj.weight", expert=True)
    assert expert.local_to_global(("3", "1"), ShardInfo(ep_rank=2, experts_per_rank=4)) == ("3", "9")


def test_registry_looks_up_both_ways_and_lists_unmapped_names():
    registry = MappingRegistry([QKV, Mapping("decoder.final_layernorm.weight", "model.norm.weight")])
    mapping, wildcards, hf = registry.megatron_to_hf("decoder.layers.7.self_attention.linear_qkv.weight")
    assert mapping is QKV and wildcards == ("7",) and hf[1] == "model.layers.7.self_attn.k_proj.weight"
    assert registry.hf_to_megatron("model.norm.weight")[2] == "decoder.final_layernorm.weight"
    with pytest.raises(BridgeError, match="no mapping for Megatron name 'decoder.layers.0.mlp.x.weight'"):
        registry.megatron_to_hf("decoder.layers.0.mlp.x.weight")
    with pytest.raises(BridgeError, match=r"Megatron names without a mapping: a\.weight; Hugging Face names without a mapping: b\.weight"):
        registry.check(["a.weight", "decoder.final_layernorm.weight"], ["b.weight", "model.norm.weight"])


def test_quantizer_state_mappings_are_off_by_default_and_derived_when_on():
    registry = MappingRegistry([QKV])
    with pytest.raises(BridgeError):
        registry.megatron_to_hf("decoder.layers.0.self_attention.linear_qkv.weight_quantizer._amax")
    registry = registry.with_quant_state()
    mapping, _, hf = registry.megatron_to_hf("decoder.layers.0.self_attention.linear_qkv.input_quantizer._amax")
    assert isinstance(mapping, AmaxMapping) and hf == [f"model.layers.0.self_attn.{p}_proj.input_quantizer._amax" for p in "qkv"]
    amax = torch.tensor(3.0)
    assert mapping.to_hf(amax) == [amax] * 3 and mapping.to_megatron([torch.tensor(1.0), amax, torch.tensor(2.0)]) == 3.0
    # K/V BMM amax, both ways, beside the weight and input quantizer mappings.
    _, _, hf = registry.megatron_to_hf("decoder.layers.3.self_attention.core_attention.v_bmm_quantizer._amax")
    assert hf == ["model.layers.3.self_attn.v_bmm_quantizer._amax"]
    _, _, name = registry.hf_to_megatron("model.layers.3.self_attn.k_bmm_quantizer._amax")
    assert name == "decoder.layers.3.self_attention.core_attention.k_bmm_quantizer._amax"
    assert registry.hf_to_megatron("model.layers.3.self_attn.k_proj.weight_quantizer._amax")[2] == (
        "decoder.layers.3.self_attention.linear_qkv.weight_quantizer._amax"
    )


def test_kv_bmm_mappings_keep_wildcards_and_prefixes():
    prefixed = QKVMapping(
        "language_model.decoder.layers.*.self_attention.linear_qkv.weight",
        tuple(f"language_model.model.layers.*.self_attn.{p}_proj.weight" for p in "qkv"),
    )
    k, v = kv_bmm_mappings(prefixed)
    assert k.megatron == "language_model.decoder.layers.*.self_attention.core_attention.k_bmm_quantizer._amax"
    assert v.hf == ("language_model.model.layers.*.self_attn.v_bmm_quantizer._amax",)
    assert k.allow_missing_hf and v.shard_dim is None


@pytest.mark.parametrize(
    "mapping",
    [
        QKVMapping("decoder.layers.*.self_attention.linear_qkv.bias", tuple(f"m.layers.*.self_attn.{p}_proj.bias" for p in "qkv")),
        ConcatenatedQKVMapping("decoder.layers.*.self_attention.linear_qkv.weight", tuple(f"m.layers.*.self_attn.{p}_proj.weight" for p in "qkv")),
        QKVMapping("decoder.layers.*.self_attention.linear_qkv.weight", tuple(f"m.layers.*.self_attn.{p}_proj.weight" for p in "qkv"), allow_missing_hf=True),
        QKVMapping("mtp.layers.*.self_attention.linear_qkv.weight", tuple(f"m.layers.*.self_attn.{p}_proj.weight" for p in "qkv")),
        QKVMapping("decoder.layers.*.self_attention.linear_qkv.weight", tuple(f"m.draft.layers.*.self_attn.{p}_proj.weight" for p in "qkv")),
        QKVMapping("decoder.layers.*.self_attention.linear_qkv.weight", ("m.layers.*.attn_a.q_proj.weight", "m.layers.*.attn_b.k_proj.weight", "m.layers.*.attn_b.v_proj.weight")),
        QKVMapping("decoder.layers.*.self_attention.linear_qkv.weight", ("m.layers.*.self_attn.qkv.weight",) * 3),
    ],
    ids=["bias", "concatenated", "allow-missing", "mtp", "draft", "different-parents", "not-q-k-v"],
)
def test_kv_bmm_mappings_skip_what_the_spec_excludes(mapping):
    assert kv_bmm_mappings(mapping) == []


def test_bridges_come_from_config_architectures():
    config = {"architectures": ["Qwen3MoeForCausalLM"], "num_local_experts": 8, "num_hidden_layers": 4, "mlp_only_layers": [1]}
    bridge = ModelBridge.from_hf(config)
    assert bridge.moe and bridge.qk_norm and bridge.num_experts == 8 and bridge.forward.moe_layers == (0, 2, 3)
    with pytest.raises(BridgeError, match=r"architectures \['GPT2LMHeadModel'\] not supported"):
        ModelBridge.from_hf({"architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(BridgeError, match=r"^config.json: mlp_only_layers = \[5\]: expected a list of layer numbers below"):
        ModelBridge.from_hf({**config, "mlp_only_layers": [5]})


def test_gqa_heads_not_divisible_by_tp_is_an_error():
    pytest.importorskip("megatron.core")
    bridge = ModelBridge.from_hf({
        "architectures": ["LlamaForCausalLM"], "num_attention_heads": 8, "num_key_value_heads": 2,
        "hidden_size": 64, "num_hidden_layers": 1, "intermediate_size": 128, "rms_norm_eps": 1e-6,
    })
    with pytest.raises(BridgeError, match="num_key_value_heads=2 is not divisible by TP=4"):
        bridge.transformer_config(tp=4)


def test_quantizer_mappings_switch_on_for_models_that_carry_quantizers():
    from dist_quant.quantizer import TensorQuantizer

    bridge = ModelBridge.from_hf({"architectures": ["LlamaForCausalLM"], "num_attention_heads": 4, "head_dim": 8, "num_hidden_layers": 1})
    plain = torch.nn.Linear(4, 4)
    assert not bridge.registry_for(plain).quant_state
    plain.weight_quantizer = TensorQuantizer()
    assert bridge.registry_for(plain).quant_state
