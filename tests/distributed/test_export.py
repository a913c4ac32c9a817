"""Export of a calibrated, sharded Qwen3-MoE to the unified HF checkpoint format, and its verifier."""

import json
import re
import shutil

import pytest
import torch

from dist_quant.export import VerificationError, load_tensors, verify
from dist_quant.numerics import nvfp4_dequantize
from dist_quant.parallel.spawn import run_ranks
from tests.distributed import bridge_workers as workers
from tests.reference.tolerance import assert_equal_up_to_rounding, transformer_roundings

pytestmark = pytest.mark.xdist_group("export")  # one worker computes the module's fixtures
RECIPE = "nvfp4_default-fp8_kv"
ACTIVATION_SCALES = (".input_scale", ".k_scale", ".v_scale")
# sharded and unsharded forwards sum in other orders: activation scales agree to their rounding
ROUNDINGS = transformer_roundings(workers.hf_config("qwen3_moe")[0].to_dict(), workers.SEQ)


# name -> (world, TP, EP, PP, recipe, writers)
LAYOUTS = {
    "tp1": (1, 1, 1, 1, RECIPE, "one"), "tp2xep2": (4, 2, 2, 1, RECIPE, "one"), "pp2xtp2": (4, 2, 1, 2, RECIPE, "one"),
    "pp2xep2": (4, 1, 2, 2, RECIPE, "all"), "fp8-tp2": (2, 2, 1, 1, "fp8_default-fp8_cast_kv", "one"),
    "tp2xep2-every-rank-writes": (4, 2, 2, 1, RECIPE, "all"),
    "w4a16-tp2xep2": (4, 2, 2, 1, "nvfp4_w4a16-fp8_cast_kv", "one"),
    "mxfp8-tp1": (1, 1, 1, 1, "mxfp8_default-fp8_cast_kv", "one"), "mxfp8-pp2xep2": (4, 1, 2, 2, "mxfp8_default-fp8_cast_kv", "all"),
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    checkpoint = workers.write_checkpoints(root)["qwen3_moe"][0]
    runs = {}
    for name, (world, tp, ep, pp, recipe, writers) in LAYOUTS.items():
        out = root / name
        runs[name] = (out, run_ranks(world, workers.calibrate_and_export, str(checkpoint), str(out), tp, ep, recipe, None, pp, writers)[0])
    return checkpoint, runs


def test_fp8_export_with_cast_kv(exports):
    out = exports[1]["fp8-tp2"][0]
    assert (verify(out)["quant_algo"], verify(out)["warnings"]) == ("FP8", [])
    tensors = load_tensors(out)
    assert tensors["model.layers.0.mlp.experts.1.gate_proj.weight"].dtype == torch.float8_e4m3fn
    assert tensors["model.layers.0.mlp.experts.1.gate_proj.weight_scale"].shape == ()
    assert tensors["model.layers.1.self_attn.attn.k_scale"] == 1.0 == tensors["model.layers.1.self_attn.attn.v_scale"]


@pytest.mark.parametrize("layout", ["tp2xep2", "pp2xtp2", "pp2xep2"])
def test_sharded_export_matches_the_unsharded_one(exports, layout):
    _, runs = exports
    single, sharded = load_tensors(runs["tp1"][0]), load_tensors(runs[layout][0])
    assert single.keys() == sharded.keys()
    assert any(k.endswith("experts.3.down_proj.weight_scale_2") for k in single) and any(k.endswith(".k_scale") for k in single)
    for name, tensor in single.items():
        if name.endswith(ACTIVATION_SCALES):
            assert_equal_up_to_rounding(sharded[name], tensor, ROUNDINGS, msg=name)
        else:
            assert sharded[name].dtype == tensor.dtype, name
            assert torch.equal(sharded[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name


def test_weights_quantized_in_smaller_groups_export_the_same_bytes(exports, tmp_path):
    """The exporter quantizes a layer's weights in groups of at most GROUP_ELEMENTS (bounding its memory on a
    DeepSeek-sized layer); how they are grouped changes no byte."""
    checkpoint, runs = exports
    out = tmp_path / "small-groups"
    run_ranks(1, workers.calibrate_and_export, str(checkpoint), str(out), 1, 1, RECIPE, None, 1, "one", 10_000)
    expected, got = load_tensors(runs["tp1"][0]), load_tensors(out)
    assert got.keys() == expected.keys()
    differing = [n for n, t in expected.items() if not torch.equal(got[n].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))]
    assert not differing, differing[:5]


def test_mxfp8_exports_as_modelopt_writes_it_the_same_bytes_at_every_layout(exports):
    """ModelOpt 0.47's MXFP8 form (what vLLM 0.33's ModelOptMxFp8Config loads): float8_e4m3fn weights, uint8 E8M0
    scales [out, in/32], no input_scale (inputs are quantized per block from the data), group_size 32, no
    config_groups; the same bytes at PP2 x EP2 as at TP1 (at TP2 the tiny experts' 16-wide fc2 inputs are refused)."""
    _, runs = exports
    out = runs["mxfp8-tp1"][0]
    report = verify(out)
    assert (report["quant_algo"], report["warnings"]) == ("MXFP8", [])
    hf_quant = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert (hf_quant["quant_algo"], hf_quant["group_size"], hf_quant["kv_cache_quant_algo"]) == ("MXFP8", 32, "FP8")
    assert "config_groups" not in json.loads((out / "config.json").read_text())["quantization_config"]
    single, sharded = load_tensors(out), load_tensors(runs["mxfp8-pp2xep2"][0])
    weight = "model.layers.1.mlp.experts.3.down_proj"
    assert single[f"{weight}.weight"].dtype == torch.float8_e4m3fn and single[f"{weight}.weight_scale"].dtype == torch.uint8
    assert single[f"{weight}.weight_scale"].shape == (single[f"{weight}.weight"].shape[0], single[f"{weight}.weight"].shape[1] // 32)
    assert not any(name.endswith((".input_scale", ".weight_scale_2")) for name in single)
    assert single.keys() == sharded.keys()
    for name, tensor in single.items():
        assert torch.equal(sharded[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name


def test_checkpoint_layout_and_configs(exports):
    checkpoint, runs = exports
    out = runs["tp2xep2"][0]
    quant = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert quant == {
        "quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8", "group_size": 16,
        "exclude_modules": ["lm_head", "model.layers.0.mlp.gate", "model.layers.1.mlp.gate"],
    }
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    # as ModelOpt 0.47 writes it, which vLLM and SGLang read first
    nvfp4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
    assert qc["config_groups"] == {"group_0": {"input_activations": nvfp4, "weights": nvfp4, "targets": ["Linear"]}}
    assert qc["kv_cache_scheme"] == {"dynamic": False, "num_bits": 8, "type": "float"}
    assert (qc["quant_method"], qc["quant_algo"], qc["ignore"]) == ("modelopt", "NVFP4", quant["exclude_modules"])
    assert (out / "generation_config.json").is_file() and len(list(out.glob("model-*-of-*.safetensors"))) > 1
    tensors = load_tensors(out)
    w = tensors["model.layers.0.self_attn.q_proj.weight"]
    assert w.dtype == torch.uint8 and w.shape == (64, 32) and tensors["model.layers.0.self_attn.q_proj.weight_scale"].shape == (64, 4)
    summary = verify(out)
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32 and summary["quantized_modules"] == 32
    assert summary["warnings"] == []  # max calibration: each weight (or its fused siblings) has a block at 448


def test_weight_only_nvfp4_exports_as_w4a16_with_the_same_weights_as_w4a4(exports):
    """NVFP4 weights with unquantized inputs: quant_algo W4A16_NVFP4, a weights-only config group, no input
    scale anywhere (as ModelOpt 0.47 writes it and vLLM / SGLang load it), and weights, block scales and scale_2
    byte for byte those of the W4A4 export (weight amax do not depend on the inputs)."""
    _, runs = exports
    out = runs["w4a16-tp2xep2"][0]
    assert (verify(out)["quant_algo"], verify(out)["warnings"]) == ("W4A16_NVFP4", [])
    quant = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert (quant["quant_algo"], quant["group_size"]) == ("W4A16_NVFP4", 16)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    nvfp4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
    assert qc["config_groups"] == {"group_0": {"weights": nvfp4, "targets": ["Linear"]}} and qc["quant_algo"] == "W4A16_NVFP4"
    w4a16, w4a4 = load_tensors(out), load_tensors(runs["tp2xep2"][0])
    assert not any(name.endswith(".input_scale") for name in w4a16)
    assert set(w4a16) == {name for name in w4a4 if not name.endswith(".input_scale")}
    weights = [n for n in w4a16 if n.endswith((".weight", ".weight_scale", ".weight_scale_2"))]
    assert any(n.endswith("experts.3.down_proj.weight_scale_2") for n in weights)
    for name in weights:
        assert torch.equal(w4a16[name].reshape(-1).view(torch.uint8), w4a4[name].reshape(-1).view(torch.uint8)), name


def test_a_model_the_checkpoint_cannot_hold_is_refused_before_anything_is_written(exports, tmp_path):
    checkpoint, _ = exports
    out = tmp_path / "out"
    fp8_weights_alone = {"quantize": {"algorithm": "max", "quant_cfg": [
        {"quantizer_name": "*", "enable": False}, {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": "e4m3"}},
    ]}}
    report = run_ranks(2, workers.calibrate_and_export, str(checkpoint), str(out), 2, 1, fp8_weights_alone)[0]
    assert re.match(
        r"rank 0: decoder\.layers\.0\.self_attention\.linear_\w+\.weight_quantizer / input_quantizer: FP8 weights "
        r"with unquantized inputs \(weight-only FP8\) have no checkpoint form", report["error"],
    ), report["error"]
    assert report["written"] == 0 and not out.exists() and list(tmp_path.iterdir()) == []


def test_dequantized_checkpoint_in_transformers_matches_megatron_fake_quant(exports, tmp_path):
    # The exported weights dequantize to exactly the fake-quant weights, so a transformers model holding them
    # differs from Megatron's weight-only fake-quant forward by float rounding alone, as the unquantized bridge
    # test does. (Activation scales apply at inference, in vLLM.)
    import transformers
    from safetensors.torch import save_file

    checkpoint, runs = exports
    out, report = runs["tp2xep2"]
    tensors = load_tensors(out)
    dense = {}
    for name, tensor in tensors.items():
        module = name[: -len(".weight")]
        if name.endswith(".weight") and f"{module}.weight_scale_2" in tensors:
            dense[name] = nvfp4_dequantize(tensor, tensors[f"{module}.weight_scale"], tensors[f"{module}.weight_scale_2"])
        elif not name.endswith((".weight_scale", ".weight_scale_2", *ACTIVATION_SCALES)):
            dense[name] = tensor
    shutil.copy(checkpoint / "config.json", tmp_path / "config.json")
    save_file(dense, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = model(workers.probe_tokens()).logits
    roundings = transformer_roundings(workers.hf_config("qwen3_moe")[0].to_dict(), workers.SEQ)
    assert_equal_up_to_rounding(logits, report["weight_only_logits"], roundings)


INDEX = "model.safetensors.index.json"
LAYER0, LAYER1 = "model.layers.0", "model.layers.1"


def _edit_json(path, edit):
    value = json.loads(path.read_text())
    edit(value)
    path.write_text(json.dumps(value))


def _corrupt(source, target, edit_tensors=None, edit_quant=None, edit_config=None, edit_index=None, edit_files=None):
    """A copy of the checkpoint `source` with edits: edit_tensors(tensors) on each shard's tensors (the index
    follows, so only the tensors are wrong), edit_quant / edit_config / edit_index on the parsed
    hf_quant_config.json / config.json / index, edit_files(directory) last."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    if edit_quant:
        _edit_json(target / "hf_quant_config.json", edit_quant)
    if edit_config:
        _edit_json(target / "config.json", edit_config)
    if edit_tensors:
        weight_map = {}
        for file in sorted(target.glob("model-*.safetensors")):
            tensors = load_file(file)
            edit_tensors(tensors)
            save_file(tensors, file, metadata={"format": "pt"})
            weight_map |= {name: file.name for name in tensors}
        _edit_json(target / INDEX, lambda index: index.__setitem__("weight_map", weight_map))
    if edit_index:
        _edit_json(target / INDEX, edit_index)
    if edit_files:
        edit_files(target)
    return target


def _nan_scale(t):
    name = "model.layers.1.self_attn.o_proj.weight_scale"
    if name in t:
        t[name] = t[name].clone()
        t[name].view(torch.uint8)[0, 0] = 0x7F


def _wrong_dtype(t):
    name = "model.layers.0.mlp.experts.2.up_proj.weight_scale_2"
    if name in t:
        t[name] = t[name].to(torch.bfloat16)


def _missing_expert(t):
    t.pop("model.layers.1.mlp.experts.3.down_proj.weight_scale", None)


def _gate_up_mismatch(t):
    name = "model.layers.0.mlp.experts.1.up_proj.weight_scale_2"
    if name in t:
        t[name] = t[name] * 2


def _drop(*names):
    return lambda t: [t.pop(name, None) for name in names]


def _drop_prefix(prefix):
    return lambda t: [t.pop(name) for name in [n for n in t if n.startswith(prefix)]]


def _replace(name, make):
    def edit(t):
        if name in t:
            t[name] = make(t[name])

    return edit


def _add(name, tensor):
    """Into the first shard only."""
    done = []

    def edit(t):
        if not done:
            t[name] = tensor
            done.append(name)

    return edit


def _quant(key, value):
    return lambda c: c["quantization"].__setitem__(key, value)


def _qc(key, value):
    return lambda c: c["quantization_config"].__setitem__(key, value)


def _set_config(key, value):
    return lambda c: c.__setitem__(key, value)


def _weight_map(name, file):
    return lambda index: index["weight_map"].__setitem__(name, file)


def _write(file, data):
    return lambda d: (d / file).write_bytes(data)


def _truncate_last_shard(d):
    last = sorted(d.glob("model-*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:-100])


ONE_LINE = re.compile(r"\A[^\n]*\Z")
SHARD = r"model-0000\d-of-0000\d\.safetensors"
FIRST_SHARD = "model-00001-of-00002.safetensors"
# id -> (source export, _corrupt's edits, regular expressions the message must match); ONE_LINE: the message is
# that single problem
PLANTED = {
    # format rules and values
    "nan-scale-byte": ("tp1", dict(edit_tensors=_nan_scale), [r"model\.layers\.1\.self_attn\.o_proj\.weight_scale holds NaN bytes"]),
    "wrong-dtype": (
        "tp1", dict(edit_tensors=_wrong_dtype),
        [r"experts\.2\.up_proj\.weight_scale_2 must be a float32 scalar, got torch\.bfloat16 \[\]"],
    ),
    "missing-expert-tensor": (
        "tp1", dict(edit_tensors=_missing_expert), [ONE_LINE, r"model\.layers\.1\.mlp\.experts\.3\.down_proj\.weight_scale is missing"],
    ),
    "missing-config-key": (
        "tp1", dict(edit_quant=lambda c: c["quantization"].pop("kv_cache_quant_algo")), [r"quantization\.kv_cache_quant_algo is missing"],
    ),
    "gate-up-mismatch": ("tp1", dict(edit_tensors=_gate_up_mismatch), [r"experts\.1\.\{gate_proj,up_proj\}\.weight_scale_2 differ"]),
    "qkv-input-scale-mismatch": (
        "tp1", dict(edit_tensors=_replace(f"{LAYER1}.self_attn.k_proj.input_scale", lambda x: x * 3)),
        [ONE_LINE, r"model\.layers\.1\.self_attn\.\{q_proj,k_proj,v_proj\}\.input_scale differ"],
    ),
    "nan-embedding": (
        "tp1", dict(edit_tensors=_replace("model.embed_tokens.weight", lambda x: x.index_fill(0, torch.tensor([3]), float("nan")))),
        [ONE_LINE, r"model\.embed_tokens\.weight holds NaN or Inf"],
    ),
    "zero-k-scale": (
        "tp1", dict(edit_tensors=_replace(f"{LAYER0}.self_attn.attn.k_scale", torch.zeros_like)),
        [ONE_LINE, r"model\.layers\.0\.self_attn\.attn\.k_scale = 0\.0 is not a positive finite scale"],
    ),
    # every tensor of the model, and nothing else
    "missing-embeddings": ("tp1", dict(edit_tensors=_drop("model.embed_tokens.weight")), [ONE_LINE, r"model\.embed_tokens\.weight is missing"]),
    "missing-lm-head": ("tp1", dict(edit_tensors=_drop("lm_head.weight")), [ONE_LINE, r"lm_head\.weight is missing"]),
    "missing-final-norm": ("tp1", dict(edit_tensors=_drop("model.norm.weight")), [ONE_LINE, r"model\.norm\.weight is missing"]),
    "missing-layernorm": (
        "tp1", dict(edit_tensors=_drop(f"{LAYER1}.post_attention_layernorm.weight")),
        [ONE_LINE, r"model\.layers\.1\.post_attention_layernorm\.weight is missing"],
    ),
    "missing-router": ("tp1", dict(edit_tensors=_drop(f"{LAYER0}.mlp.gate.weight")), [ONE_LINE, r"model\.layers\.0\.mlp\.gate\.weight is missing"]),
    "missing-layer": ("tp1", dict(edit_tensors=_drop_prefix(f"{LAYER1}.")), [ONE_LINE, r": model\.layers\.1: all 71 tensors are missing"]),
    "missing-expert": (
        "tp1", dict(edit_tensors=_drop_prefix(f"{LAYER0}.mlp.experts.2.")),
        [ONE_LINE, r": model\.layers\.0\.mlp\.experts\.2: all 12 tensors are missing"],
    ),
    "missing-dense-weight": (
        "tp1", dict(edit_tensors=_drop(f"{LAYER0}.self_attn.o_proj.weight")), [ONE_LINE, r"model\.layers\.0\.self_attn\.o_proj\.weight is missing"],
    ),
    "missing-weight-scale": (
        "tp1", dict(edit_tensors=_drop(f"{LAYER0}.self_attn.q_proj.weight_scale")),
        [ONE_LINE, r"model\.layers\.0\.self_attn\.q_proj\.weight_scale is missing"],
    ),
    "missing-input-scale": (
        "tp1", dict(edit_tensors=_drop(f"{LAYER1}.self_attn.o_proj.input_scale")),
        [ONE_LINE, r"model\.layers\.1\.self_attn\.o_proj\.input_scale is missing"],
    ),
    "fp8-missing-weight-scale": (
        "fp8-tp2", dict(edit_tensors=_drop(f"{LAYER1}.mlp.experts.0.up_proj.weight_scale")),
        [ONE_LINE, r"model\.layers\.1\.mlp\.experts\.0\.up_proj\.weight_scale is missing"],
    ),
    "int32-norm": (
        "tp1", dict(edit_tensors=_replace("model.norm.weight", lambda x: x.to(torch.int32))),
        [ONE_LINE, r"model\.norm\.weight has dtype torch\.int32, expected torch\.float32 or torch\.bfloat16 or torch\.float16"],
    ),
    "short-norm": (
        "tp1", dict(edit_tensors=_replace(f"{LAYER0}.input_layernorm.weight", lambda x: x[:32].clone())),
        [ONE_LINE, r"model\.layers\.0\.input_layernorm\.weight has shape \[32\], expected \[64\]"],
    ),
    "narrow-packed-weight": (
        "tp1", dict(edit_tensors=_replace(f"{LAYER0}.self_attn.o_proj.weight", lambda x: x[:, :16].clone())),
        [ONE_LINE, r"model\.layers\.0\.self_attn\.o_proj\.weight has shape \[64, 16\], expected \[64, 32\]"],
    ),
    "unknown-tensor": (
        "tp1", dict(edit_tensors=_add(f"{LAYER0}.mlp.shared_expert.weight", torch.zeros(4, 4))),
        [ONE_LINE, r"model\.layers\.0\.mlp\.shared_expert\.weight is not expected by config\.json and hf_quant_config\.json"],
    ),
    # hf_quant_config.json against the tensors
    "bogus-algo": (
        "tp1", dict(edit_quant=_quant("quant_algo", "BOGUS")),
        [r"quantization\.quant_algo is 'BOGUS', expected NVFP4, W4A16_NVFP4, FP8, MXFP8 or MIXED_PRECISION"],
    ),
    "fp8-over-nvfp4": (
        "tp1", dict(edit_quant=_quant("quant_algo", "FP8"), edit_config=_qc("quant_algo", "FP8")),
        [r"model\.layers\.0\.self_attn\.q_proj is stored as NVFP4, but no exclude_modules pattern matches it, so it must be FP8"],
    ),
    "nvfp4-over-fp8": (
        "fp8-tp2", dict(edit_quant=_quant("quant_algo", "NVFP4"), edit_config=_qc("quant_algo", "NVFP4")),
        [r"model\.layers\.0\.self_attn\.q_proj is stored as FP8, but no exclude_modules pattern matches it, so it must be NVFP4"],
    ),
    "group-size-32": ("tp1", dict(edit_quant=_quant("group_size", 32)), [ONE_LINE, r"quantization\.group_size is 32, expected 16"]),
    "kv-null-with-scales": (
        "tp1", dict(edit_quant=_quant("kv_cache_quant_algo", None), edit_config=_qc("kv_cache_scheme", None)),
        [r"model\.layers\.0\.self_attn\.attn\.k_scale is stored, but kv_cache_quant_algo is null",
         r"model\.layers\.1\.self_attn\.attn\.v_scale is stored, but kv_cache_quant_algo is null"],
    ),
    "exclude-emptied": (
        "tp1", dict(edit_quant=_quant("exclude_modules", []), edit_config=_qc("ignore", [])),
        [r"\A\S+: 3 problems:",
         r"lm_head is stored unquantized \(torch\.float32 weight\), but no exclude_modules pattern matches it, so it must be NVFP4",
         r"model\.layers\.0\.mlp\.gate is stored unquantized \(torch\.float32 weight\)",
         r"model\.layers\.1\.mlp\.gate is stored unquantized \(torch\.float32 weight\)"],
    ),
    # config.json's quantization_config against hf_quant_config.json
    "config-quant-algo": (
        "tp1", dict(edit_config=_qc("quant_algo", "FP8")),
        [ONE_LINE, r'config\.json: quantization_config\.quant_algo is "FP8", expected "NVFP4"'],
    ),
    "config-ignore": (
        "tp1", dict(edit_config=_qc("ignore", ["lm_head"])),
        [ONE_LINE, r"quantization_config\.ignore differs from hf_quant_config\.json's exclude_modules \(only in ignore: \[\]; "
         r"only in exclude_modules: \['model\.layers\.0\.mlp\.gate', 'model\.layers\.1\.mlp\.gate'\]\)"],
    ),
    "config-kv-scheme": (
        "tp1", dict(edit_config=_qc("kv_cache_scheme", {"type": "float", "num_bits": 4})),
        [ONE_LINE, r'kv_cache_scheme is \{"type": "float", "num_bits": 4\}, expected \{"dynamic": false, "num_bits": 8, '
         r'"type": "float"\}'],
    ),
    "config-quant-method": (
        "tp1", dict(edit_config=_qc("quant_method", "fp8")),
        [ONE_LINE, r'hf_quant_config\.json is stored, but config\.json\'s quantization_config has quant_method "fp8"'],
    ),
    # config.json's model against the stored shapes
    "config-fewer-experts": (
        "tp1", dict(edit_config=_set_config("num_local_experts", 2)),
        [r"model\.layers\.0\.mlp\.experts\.2: 12 tensors not expected by config\.json",
         r"model\.layers\.1\.mlp\.experts\.3: 12 tensors not expected by config\.json",
         r"model\.layers\.0\.mlp\.gate\.weight has shape \[4, 64\], expected \[2, 64\]"],
    ),
    "config-hidden-size": (
        "tp1", dict(edit_config=_set_config("hidden_size", 32)),
        [r"model\.embed_tokens\.weight has shape \[128, 64\], expected \[128, 32\]"],
    ),
    # the index and the files
    "index-names-absent-tensor": (
        "tp1", dict(edit_index=_weight_map(f"{LAYER0}.mlp.extra.weight", FIRST_SHARD)),
        [ONE_LINE, rf"model\.safetensors\.index\.json maps model\.layers\.0\.mlp\.extra\.weight to {SHARD}, which does not hold it"],
    ),
    "index-names-missing-file": (
        "tp1", dict(edit_index=_weight_map("lm_head.weight", "model-00003-of-00002.safetensors")),
        [r"model\.safetensors\.index\.json names model-00003-of-00002\.safetensors, which does not exist \(1 tensors\)"],
    ),
    "index-points-outside": (
        "tp1", dict(edit_index=_weight_map("lm_head.weight", "../outside.safetensors"), edit_files=_write("../outside.safetensors", b"x")),
        [r"model\.safetensors\.index\.json names '\.\./outside\.safetensors', outside the checkpoint directory: refused"],
    ),
    "index-absolute-path": (
        "tp1", dict(edit_index=_weight_map("lm_head.weight", "/etc/hostname")),
        [r"model\.safetensors\.index\.json names '/etc/hostname', outside the checkpoint directory: refused"],
    ),
    "tensor-absent-from-index": (
        "tp1", dict(edit_index=lambda index: index["weight_map"].pop(f"{LAYER1}.mlp.gate.weight")),
        [ONE_LINE, rf"model\.layers\.1\.mlp\.gate\.weight is stored in {SHARD}, but model\.safetensors\.index\.json does not list it"],
    ),
    "truncated-shard": ("tp1", dict(edit_files=_truncate_last_shard), [ONE_LINE, rf"{SHARD} is not a readable safetensors file \(.+\)"]),
    "garbage-shard": (
        "tp1", dict(edit_files=_write(FIRST_SHARD, b"\0" * 64)), [ONE_LINE, rf"{SHARD} is not a readable safetensors file \(.+\)"],
    ),
    "garbage-config": ("tp1", dict(edit_files=_write("config.json", b"{'no': json")), [ONE_LINE, r"config\.json is not readable JSON \(.+\)"]),
    "config-not-object": ("tp1", dict(edit_files=_write("config.json", b"null")), [ONE_LINE, r"config\.json holds a JSON null, not an object"]),
    "garbage-quant-config": (
        "tp1", dict(edit_files=_write("hf_quant_config.json", b"\x89PNG")), [ONE_LINE, r"hf_quant_config\.json is not readable JSON \(.+\)"],
    ),
    "missing-config": ("tp1", dict(edit_files=lambda d: (d / "config.json").unlink()), [ONE_LINE, r"\A\S+: config\.json is missing\Z"]),
}


@pytest.mark.parametrize("source, edits, patterns", PLANTED.values(), ids=PLANTED.keys())
def test_verify_catches_each_planted_corruption(exports, tmp_path, source, edits, patterns):
    _, runs = exports
    broken = _corrupt(runs[source][0], tmp_path / "broken", **edits)
    with pytest.raises(VerificationError) as caught:
        verify(broken)
    for pattern in patterns:
        assert re.search(pattern, str(caught.value)), f"{pattern} not found in:\n{caught.value}"


def test_an_interrupted_export_leaves_nothing_that_looks_complete(exports, tmp_path):
    checkpoint, _ = exports
    out = tmp_path / "out"
    report = run_ranks(2, workers.calibrate_and_export, str(checkpoint), str(out), 2, 1, RECIPE, 20)[0]
    assert "simulated failure" in report["error"] and report["written"] == 20
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_inspect_summarizes_and_verifies(exports, tmp_path):
    import subprocess
    import sys

    _, runs = exports
    run = lambda d: subprocess.run([sys.executable, "-m", "dist_quant.cli", "inspect", str(d)], capture_output=True, text=True)  # noqa: E731
    good = run(runs["tp1"][0])
    assert good.returncode == 0 and "NVFP4 weights, KV cache FP8" in good.stdout and "32 quantized modules" in good.stdout
    bad = run(_corrupt(runs["tp1"][0], tmp_path / "broken", _missing_expert))
    assert bad.returncode == 2 and "experts.3.down_proj.weight_scale is missing" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_sync_is_one_all_reduce_per_reduction_domain_and_stage(exports, layout):
    sync, world = exports[1][layout][1]["sync"], LAYOUTS[layout][0]
    # one MAX all-reduce per reduction domain of this rank's stage, and one world-wide flag (errors collective)
    assert sync["collectives"] == sync["domains"] + (world > 1) and (sync["domains"] >= 1) == (world > 1)


def test_every_rank_writing_its_share_gives_the_same_checkpoint(exports):
    _, runs = exports
    one, every = load_tensors(runs["tp2xep2"][0]), load_tensors(runs["tp2xep2-every-rank-writes"][0])
    assert one.keys() == every.keys()
    for name, tensor in one.items():
        assert every[name].dtype == tensor.dtype and torch.equal(every[name].view(-1).view(torch.uint8), tensor.view(-1).view(torch.uint8)), name
    # EP rank 1 (global rank 2) wrote experts 2 and 3 itself: its shards hold them and nothing else
    weight_map = json.loads((runs["tp2xep2-every-rank-writes"][0] / "model.safetensors.index.json").read_text())["weight_map"]
    by_file = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, set()).add(re.search(r"\.experts\.[23]\.", name) is not None)
    assert {True} in by_file.values() and all(len(kinds) == 1 for kinds in by_file.values()), by_file
