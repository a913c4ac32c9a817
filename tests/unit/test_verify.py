"""verify() on checkpoints written by hand from tiny transformers models, whose tensor names come from
transformers rather than from the bridge: good ones pass, and each planted mistake is named in one line."""

import json
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dist_quant.export import VerificationError, load_tensors, verify
from dist_quant.numerics import fp8_quantize, nvfp4_quantize

TINY = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, head_dim=16, max_position_embeddings=32, tie_word_embeddings=False,
)
LINEARS = 7  # q, k, v, o, gate, up, down per layer
INDEX = "model.safetensors.index.json"
NVFP4_ALGOS = ("NVFP4", "W4A16_NVFP4")  # packed weights and block scales; W4A16_NVFP4 without input scales


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """name -> (config.json, float32 tensors) as transformers saves a tiny Llama, and a Qwen3 whose sliding
    window acts only beyond 16 tokens."""
    import transformers

    configs = {
        "llama": transformers.LlamaConfig(**TINY),
        "qwen3": transformers.Qwen3Config(**TINY, use_sliding_window=True, sliding_window=16, max_window_layers=0),
    }
    out = {}
    for name, config in configs.items():
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(name)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
        out[name] = (json.loads((path / "config.json").read_text()), load_file(path / "model.safetensors"))
    return out


def write(directory: Path, source, algo="NVFP4", kv="FP8", exclude=("lm_head",), layers=None, shards=1, dtype=torch.float32):
    """A checkpoint as docs/checkpoint.md lays it out. layers: MIXED_PRECISION's module -> format."""
    config, state = source
    tensors = {}
    # max calibration: a weight's scale from its amax, fused siblings' from the largest of theirs (one scale_2)
    amax = {}
    for name, weight in state.items():
        amax[_siblings(name)] = max(amax.get(_siblings(name), 0.0), weight.abs().max().item())
    for name, weight in state.items():
        module = name.removesuffix(".weight")
        fmt = None
        if name.endswith(".weight") and weight.dim() == 2 and "embed_tokens" not in name:
            fmt = layers.get(module) if layers is not None else None if any(fnmatchcase(module, p) for p in exclude) else algo
        if fmt in NVFP4_ALGOS:
            packed, block, scale_2 = nvfp4_quantize(weight, amax[_siblings(name)])
            tensors |= {name: packed, f"{module}.weight_scale": block, f"{module}.weight_scale_2": scale_2.reshape(())}
        elif fmt == "FP8":
            q, scale = fp8_quantize(weight, amax[_siblings(name)])
            tensors |= {name: q, f"{module}.weight_scale": scale.reshape(())}
        else:
            tensors[name] = weight.to(dtype)
        if fmt not in (None, "W4A16_NVFP4"):
            tensors[f"{module}.input_scale"] = torch.tensor(0.02)
        if kv and name.endswith(("k_proj.weight", "v_proj.weight")):
            tensors[f"{module}.{name.split('.')[-2][0]}_scale"] = torch.tensor(1.0)
    directory.mkdir()
    if shards == 1:
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    else:
        names = sorted(tensors)
        files = {f"model-{i + 1:05d}-of-{shards:05d}.safetensors": names[i::shards] for i in range(shards)}
        for file, part in files.items():
            save_file({n: tensors[n] for n in part}, directory / file, metadata={"format": "pt"})
        weight_map = {n: f for f, part in files.items() for n in part}
        (directory / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    # the configs as ModelOpt 0.47's exporter lays them out (get_quant_config, convert_hf_quant_config_format)
    producer = {"name": "dist_quant", "version": "0"}
    quantization = {"quant_algo": algo, "kv_cache_quant_algo": kv}
    if layers is not None:
        quantization["quantized_layers"] = {
            m: {"quant_algo": a, **({"group_size": 16} if a in NVFP4_ALGOS else {})} for m, a in layers.items()
        }
    else:
        quantization |= ({"group_size": 16} if algo in NVFP4_ALGOS else {}) | {"exclude_modules": list(exclude)}
    (directory / "hf_quant_config.json").write_text(json.dumps({"producer": producer, "quantization": quantization}))

    def group(fmt, targets):
        tensors = {"dynamic": False, "num_bits": 4 if fmt in NVFP4_ALGOS else 8, "type": "float"}
        tensors |= {"group_size": 16} if fmt in NVFP4_ALGOS else {}
        inputs = {} if fmt == "W4A16_NVFP4" else {"input_activations": tensors}  # weight-only: weights alone
        return {**inputs, "weights": tensors, "targets": targets}

    if layers is None:
        groups, listing = {"group_0": group(algo, ["Linear"])}, {"ignore": list(exclude)}
    else:
        fmts = sorted(set(layers.values()))
        groups = {f"group_{i}": group(f, sorted(m for m, a in layers.items() if a == f)) for i, f in enumerate(fmts)}
        listing = {"ignore": [], "quantized_layers": quantization["quantized_layers"]}
    quantization_config = {"config_groups": groups, **listing, "quant_algo": algo, "producer": producer, "quant_method": "modelopt"}
    if kv is not None:
        quantization_config["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"} if kv == "FP8" else kv
    (directory / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    return directory


def _siblings(name: str) -> str:
    """The fused siblings (q/k/v, gate/up) a tensor's module belongs to, or the module."""
    parent, _, leaf = name.removesuffix(".weight").rpartition(".")
    return parent + {"q_proj": ".qkv", "k_proj": ".qkv", "v_proj": ".qkv", "gate_proj": ".gate_up", "up_proj": ".gate_up"}.get(leaf, f".{leaf}")


def edit_json(path: Path, edit) -> None:
    value = json.loads(path.read_text())
    edit(value)
    path.write_text(json.dumps(value))


def edit_tensors(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def failure(directory: Path) -> str:
    with pytest.raises(VerificationError) as info:
        verify(directory)
    return str(info.value)


def mixed_layers(attention="FP8", mlp="NVFP4", q_proj=None) -> dict:
    layers = {}
    for i in range(TINY["num_hidden_layers"]):
        layers |= {f"model.layers.{i}.self_attn.{p}": attention for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
        layers |= {f"model.layers.{i}.mlp.{p}": mlp for p in ("gate_proj", "up_proj", "down_proj")}
        layers[f"model.layers.{i}.self_attn.q_proj"] = q_proj or attention
    return layers


@pytest.mark.parametrize(
    "kwargs, summary, added",
    [
        ({}, ("NVFP4", "FP8", 2 * LINEARS), 3 * 2 * LINEARS + 4),
        ({"shards": 3}, ("NVFP4", "FP8", 2 * LINEARS), 3 * 2 * LINEARS + 4),
        ({"algo": "FP8", "kv": None}, ("FP8", None, 2 * LINEARS), 2 * 2 * LINEARS),
        ({"kv": "NVFP4", "dtype": torch.bfloat16}, ("NVFP4", "NVFP4", 2 * LINEARS), 3 * 2 * LINEARS + 4),
        ({"exclude": ["lm_head", "*self_attn*"]}, ("NVFP4", "FP8", 2 * 3), 3 * 2 * 3 + 4),
        ({"exclude": []}, ("NVFP4", "FP8", 2 * LINEARS + 1), 3 * (2 * LINEARS + 1) + 4),
        ({"algo": "MIXED_PRECISION", "layers": mixed_layers(), "exclude": []}, ("MIXED_PRECISION", "FP8", 2 * LINEARS), 2 * 8 + 3 * 6 + 4),
        ({"algo": "W4A16_NVFP4"}, ("W4A16_NVFP4", "FP8", 2 * LINEARS), 2 * 2 * LINEARS + 4),
        (
            {"algo": "MIXED_PRECISION", "layers": mixed_layers("FP8", "W4A16_NVFP4"), "exclude": []},
            ("MIXED_PRECISION", "FP8", 2 * LINEARS), 2 * 8 + 2 * 6 + 4,
        ),
    ],
    ids=["nvfp4", "sharded", "fp8-no-kv", "bf16-nvfp4-kv", "mlp-only", "lm-head-quantized", "mixed", "w4a16", "mixed-w4a16"],
)
def test_a_good_checkpoint_passes_and_is_summarized(sources, tmp_path, kwargs, summary, added):
    source = sources["llama"]
    out = verify(write(tmp_path / "ckpt", source, **kwargs))
    assert (out["quant_algo"], out["kv_cache_quant_algo"], out["quantized_modules"]) == summary
    assert out["tensors"] == len(source[1]) + added and out["excluded"] == list(kwargs.get("exclude", ["lm_head"]))
    assert out["warnings"] == []  # every weight's scales from its amax, as max calibration makes them


def test_a_sliding_window_config_verifies_since_shapes_do_not_depend_on_length(sources, tmp_path):
    from dist_quant.bridge import BridgeError, ModelBridge

    config = sources["qwen3"][0]
    with pytest.raises(BridgeError, match="sliding window"):  # the calibration would need --seq-len
        ModelBridge.from_hf(config)
    assert verify(write(tmp_path / "ckpt", sources["qwen3"]))["quantized_modules"] == 2 * LINEARS


def test_load_tensors_reads_every_shard(sources, tmp_path):
    tensors = load_tensors(write(tmp_path / "ckpt", sources["llama"], shards=3))
    assert tensors["model.layers.1.mlp.down_proj.weight"].dtype == torch.uint8 and len(tensors) == 21 + 3 * 14 + 4


# -- one planted mistake each -------------------------------------------------------------------------
def _tensor(name, value):
    def plant(d):
        edit_tensors(d / "model.safetensors", lambda t: t.__setitem__(name, value(t[name]) if callable(value) else value))

    return plant


def _drop(*names):
    return lambda d: edit_tensors(d / "model.safetensors", lambda t: [t.pop(n) for n in names])


def _quant(edit):
    return lambda d: edit_json(d / "hf_quant_config.json", lambda c: edit(c["quantization"]))


def _config(edit):
    return lambda d: edit_json(d / "config.json", edit)


def _write(file, data: bytes):
    return lambda d: (d / file).write_bytes(data)


def _truncate(d):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def _index(edit):
    return lambda d: edit_json(d / INDEX, lambda i: edit(i["weight_map"]))


def _block_byte(value):
    def set_byte(block):
        block = block.clone()
        block.view(torch.uint8)[3, 1] = value
        return block

    return _tensor("model.layers.0.mlp.up_proj.weight_scale", set_byte)


LAYER0 = "model.layers.0"
SHARD1 = "model-00001-of-00002.safetensors"
# id -> (write()'s arguments, plant(directory) or None where write() makes it broken, patterns): one string ->
# the message is that one problem, in one line; a list -> each appears, among others
CASES = {
    "missing-config": ({}, lambda d: (d / "config.json").unlink(), "config.json is missing"),
    "garbage-config": ({}, _write("config.json", b"\xff\xfe{not json"), "config.json is not readable JSON ("),
    "config-not-object": ({}, _write("config.json", b"[1, 2]"), "config.json holds a JSON array, not an object"),
    "garbage-quant-config": ({}, _write("hf_quant_config.json", b"{"), "hf_quant_config.json is not readable JSON ("),
    "quant-config-not-object": ({}, _write("hf_quant_config.json", b'"NVFP4"'), "hf_quant_config.json holds a JSON string, not an object"),
    "truncated-safetensors": ({}, _truncate, "model.safetensors is not a readable safetensors file (Error while deserializing"),
    "garbage-safetensors": (
        {}, _write("model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00not a header"),
        "model.safetensors is not a readable safetensors file (",
    ),
    "no-safetensors": ({}, lambda d: (d / "model.safetensors").unlink(), "no model.safetensors or model.safetensors.index.json"),
    "stray-file": (
        {}, lambda d: save_file({"x": torch.zeros(1)}, d / "extra.safetensors"),
        "extra.safetensors is not part of the checkpoint (there is no model.safetensors.index.json)",
    ),
    "garbage-index": ({"shards": 2}, _write(INDEX, b"nope"), "model.safetensors.index.json is not readable JSON ("),
    "index-without-weight-map": ({"shards": 2}, _write(INDEX, b"{}"), "weight_map must be an object of tensor name -> file name"),
    "index-names-missing-file": (
        {"shards": 2}, _index(lambda m: m.__setitem__("lm_head.weight", "model-00009-of-00009.safetensors")),
        [f"{INDEX} names model-00009-of-00009.safetensors, which does not exist (1 tensors)",
         f"but {INDEX} maps it to model-00009-of-00009.safetensors"],
    ),
    "index-names-absent-tensor": (
        {"shards": 2}, _index(lambda m: m.__setitem__("model.layers.0.mlp.extra.weight", SHARD1)),
        f"{INDEX} maps model.layers.0.mlp.extra.weight to {SHARD1}, which does not hold it",
    ),
    "tensor-absent-from-index": (
        {"shards": 2}, _index(lambda m: m.pop("model.norm.weight")), f".safetensors, but {INDEX} does not list it",
    ),
    "stray-shard": (
        {"shards": 2}, lambda d: save_file({"x": torch.zeros(1)}, d / "model.safetensors"),
        f"model.safetensors is not part of the checkpoint ({INDEX} does not name it)",
    ),
    "unknown-architecture": (
        {}, _config(lambda c: c.__setitem__("architectures", ["GPT2LMHeadModel"])),
        "config.json: cannot derive the model's tensors (BridgeError: architectures ['GPT2LMHeadModel'] not supported",
    ),
    "extra-layer": ({}, _config(lambda c: c.__setitem__("num_hidden_layers", 1)), "model.layers.1: 32 tensors not expected by config.json"),
    "unsplittable-features": (
        {}, _config(lambda c: c.__setitem__("intermediate_size", 40)),
        ["model.layers.0.mlp.down_proj: 40 input features do not split into NVFP4 blocks of 16",
         "model.layers.0.mlp.gate_proj.weight has shape [64, 16], expected [40, 16]"],
    ),
    "missing-kv-scale": ({}, _drop(f"{LAYER0}.self_attn.v_proj.v_scale"), "model.layers.0.self_attn.v_proj.v_scale is missing"),
    "leftover-scale-on-excluded": (
        {}, _tensor("lm_head.input_scale", torch.tensor(1.0)),
        "lm_head.input_scale is not expected by config.json and hf_quant_config.json",
    ),
    "float64-tensor": (
        {}, _tensor("model.norm.weight", lambda t: t.double()),
        "model.norm.weight has dtype torch.float64, expected torch.float32 or torch.bfloat16 or torch.float16",
    ),
    "scale-of-shape-1": (
        {}, _tensor(f"{LAYER0}.mlp.up_proj.weight_scale_2", lambda t: t.reshape(1)),
        "model.layers.0.mlp.up_proj.weight_scale_2 must be a float32 scalar, got torch.float32 [1]",
    ),
    "zero-input-scale": (
        {}, _tensor(f"{LAYER0}.mlp.down_proj.input_scale", torch.tensor(0.0)),
        "model.layers.0.mlp.down_proj.input_scale = 0.0 is not a positive finite scale",
    ),
    "inf-k-scale": (
        {}, _tensor(f"{LAYER0}.self_attn.k_proj.k_scale", torch.tensor(float("inf"))),
        "model.layers.0.self_attn.k_proj.k_scale = inf is not a positive finite scale",
    ),
    # the engines quantize activations by x * (1 / scale): a denormal scale is positive and finite, its
    # reciprocal is not
    "input-scale-with-infinite-reciprocal": (
        {}, _tensor(f"{LAYER0}.mlp.down_proj.input_scale", torch.tensor(1e-45)),
        "model.layers.0.mlp.down_proj.input_scale = 1.401298464324817e-45: its reciprocal, which the engines compute "
        "to quantize activations, overflows float32",
    ),
    "kv-scale-with-infinite-reciprocal": (
        {"algo": "FP8"}, _tensor(f"{LAYER0}.self_attn.v_proj.v_scale", torch.tensor(2.0 ** -128)),
        "model.layers.0.self_attn.v_proj.v_scale = 2.938735877055719e-39: its reciprocal",
    ),
    "overflowing-scale-2": (
        {}, _tensor(f"{LAYER0}.mlp.down_proj.weight_scale_2", torch.tensor(1e38)),
        "model.layers.0.mlp.down_proj dequantizes to non-finite values",
    ),
    "zero-block-scale": ({}, _block_byte(0x00), "model.layers.0.mlp.up_proj.weight_scale holds zero or negative scales"),
    "negative-block-scale": ({}, _block_byte(0xB8), "model.layers.0.mlp.up_proj.weight_scale holds zero or negative scales"),
    "nan-block-scale": ({}, _block_byte(0xFF), "model.layers.0.mlp.up_proj.weight_scale holds NaN bytes"),
    "nan-fp8-weight": (
        {"algo": "FP8"},
        _tensor("model.layers.1.self_attn.o_proj.weight", lambda t: t.view(torch.uint8).clone().fill_(0x7F).view(torch.float8_e4m3fn)),
        "model.layers.1.self_attn.o_proj.weight holds NaN bytes",
    ),
    "fp8-missing-weight-scale": ({"algo": "FP8"}, _drop(f"{LAYER0}.mlp.gate_proj.weight_scale"), "model.layers.0.mlp.gate_proj.weight_scale is missing"),
    "fp8-bf16-weight-scale": (
        {"algo": "FP8"}, _tensor(f"{LAYER0}.mlp.gate_proj.weight_scale", lambda t: t.bfloat16()),
        "model.layers.0.mlp.gate_proj.weight_scale must be a float32 scalar, got torch.bfloat16 []",
    ),
    "qkv-input-scales-differ": (
        {}, _tensor(f"{LAYER0}.self_attn.v_proj.input_scale", torch.tensor(0.5)),
        "model.layers.0.self_attn.{q_proj,k_proj,v_proj}.input_scale differ: fused siblings share one scale",
    ),
    "qkv-formats-differ": (
        {"algo": "MIXED_PRECISION", "layers": mixed_layers("NVFP4", "NVFP4", q_proj="FP8")}, None,  # written so
        ["model.layers.0.self_attn.{q_proj,k_proj,v_proj} are FP8, NVFP4, NVFP4: vLLM fuses them into one layer",
         "model.layers.1.self_attn.{q_proj,k_proj,v_proj} are FP8, NVFP4, NVFP4"],
    ),
    "mixed-format-disagrees": (
        {"algo": "MIXED_PRECISION", "layers": mixed_layers()},
        _quant(lambda q: q["quantized_layers"].__setitem__(f"{LAYER0}.mlp.down_proj", {"quant_algo": "FP8"})),
        ["model.layers.0.mlp.down_proj is stored as NVFP4, but quantized_layers says FP8", "config.json: quantization_config.quantized_layers is"],
    ),
    "mixed-module-unlisted": (
        {"algo": "MIXED_PRECISION", "layers": mixed_layers()}, _quant(lambda q: q["quantized_layers"].pop(f"{LAYER0}.mlp.up_proj")),
        ["model.layers.0.mlp.up_proj is stored as NVFP4, but quantized_layers does not list it", "config.json: quantization_config.quantized_layers is"],
    ),
    "mixed-lists-a-stranger": (
        {"algo": "MIXED_PRECISION", "layers": mixed_layers()},
        _quant(lambda q: q["quantized_layers"].__setitem__("model.layers.7.mlp.up_proj", {"quant_algo": "FP8"})),
        ["hf_quant_config.json: quantized_layers lists model.layers.7.mlp.up_proj, which the model has not", "config.json: quantization_config.quantized_layers is"],
    ),
    "mixed-without-layers": (
        {"algo": "MIXED_PRECISION", "layers": mixed_layers()}, _quant(lambda q: q.pop("quantized_layers")),
        "hf_quant_config.json: quantization.quantized_layers is missing (MIXED_PRECISION needs it)",
    ),
    "layers-without-mixed": (
        {}, _quant(lambda q: q.__setitem__("quantized_layers", {})),
        "hf_quant_config.json: quantization.quantized_layers is given, but quant_algo is 'NVFP4'",
    ),
    "excluded-but-quantized": (
        {}, _quant(lambda q: q["exclude_modules"].append("*.q_proj")),
        ["model.layers.0.self_attn.q_proj is stored as NVFP4, but exclude_modules excludes it",
         "model.layers.1.self_attn.q_proj is stored as NVFP4, but exclude_modules excludes it",
         "config.json: quantization_config.ignore differs from hf_quant_config.json's exclude_modules "
         "(only in ignore: []; only in exclude_modules: ['*.q_proj'])"],
    ),
    "bad-kv-algo": (
        {}, _quant(lambda q: q.__setitem__("kv_cache_quant_algo", "INT8")),
        "hf_quant_config.json: quantization.kv_cache_quant_algo is 'INT8', expected FP8, NVFP4, null",
    ),
    "no-producer": (
        {}, lambda d: edit_json(d / "hf_quant_config.json", lambda c: c.pop("producer")),
        "hf_quant_config.json: producer needs name and version",
    ),
    "no-quantization-config": ({}, _config(lambda c: c.pop("quantization_config")), "config.json: quantization_config is missing or not an object"),
    # vLLM's --kv-cache-dtype auto turns the FP8 cache on only with "dynamic": false (vllm 0.33 utils/torch_utils.py
    # get_kv_cache_quant_algo_string), and SGLang takes the NVFP4 group size from config_groups
    "kv-scheme-without-dynamic": (
        {}, _config(lambda c: c["quantization_config"].__setitem__("kv_cache_scheme", {"num_bits": 8, "type": "float"})),
        'config.json: quantization_config.kv_cache_scheme is {"num_bits": 8, "type": "float"}, expected {"dynamic": false',
    ),
    "no-config-groups": (
        {}, _config(lambda c: c["quantization_config"].pop("config_groups")),
        "config.json: quantization_config.config_groups is missing",
    ),
    # weight-only NVFP4 holds no input scales (vLLM registers none for W4A16_NVFP4), and says so in its configs
    "w4a16-with-input-scale": (
        {"algo": "W4A16_NVFP4"}, _tensor(f"{LAYER0}.mlp.up_proj.input_scale", torch.tensor(0.02)),
        "model.layers.0.mlp.up_proj.input_scale is not expected by config.json and hf_quant_config.json",
    ),
    "w4a16-declared-w4a4": (
        {"algo": "W4A16_NVFP4"},
        lambda d: [_quant(lambda q: q.__setitem__("quant_algo", "NVFP4"))(d),
                   _config(lambda c: c["quantization_config"].__setitem__("quant_algo", "NVFP4"))(d)],
        ["model.layers.0.self_attn.q_proj.input_scale is missing", "config.json: quantization_config.config_groups is"],
    ),
    "w4a16-group-with-inputs": (
        {"algo": "W4A16_NVFP4"},
        _config(lambda c: c["quantization_config"]["config_groups"]["group_0"].__setitem__("input_activations", {"num_bits": 4})),
        'config.json: quantization_config.config_groups is {"group_0": {"weights": ',
    ),
    "kv-scheme-without-kv-algo": (
        {"kv": None}, _config(lambda c: c["quantization_config"].__setitem__("kv_cache_scheme", "FP8")),
        'config.json: quantization_config.kv_cache_scheme is "FP8", but kv_cache_quant_algo is null',
    ),
}


@pytest.mark.parametrize("kwargs, plant, patterns", CASES.values(), ids=CASES.keys())
def test_each_planted_mistake_is_named(sources, tmp_path, kwargs, plant, patterns):
    directory = write(tmp_path / "ckpt", sources["llama"], **kwargs)
    if plant is not None:
        verify(directory)  # good before the plant
        plant(directory)
    message = failure(directory)
    if isinstance(patterns, str):
        assert message.startswith(f"{directory}: ") and "\n" not in message and patterns in message, message
    else:
        assert all(p in message for p in patterns), message


def test_the_smallest_activation_scale_with_a_finite_reciprocal_passes(sources, tmp_path):
    directory = write(tmp_path / "ckpt", sources["llama"])
    smallest = torch.tensor(2.0 ** -128).nextafter(torch.tensor(1.0))  # 1 / it: 3.4028e38; 1 / 2^-128 is inf
    _tensor(f"{LAYER0}.mlp.down_proj.input_scale", smallest)(directory)
    _tensor(f"{LAYER0}.self_attn.k_proj.k_scale", smallest)(directory)
    assert verify(directory)["warnings"] == []


def _halved(weight: str, *modules: str, scale_doubled: bool = True):
    """Every block scale (NVFP4) or weight value (FP8) of the modules halved, and with `scale_doubled` their
    per-tensor scale doubled: what a calibration writes when the scale is twice the amax's (it dequantizes
    alike); without, a weight of half the values under the same scale (a sibling of a larger one)."""
    def shrink(tensors):
        for module in modules:
            scale = f"{module}.weight_scale_2" if weight == "nvfp4" else f"{module}.weight_scale"
            halved = f"{module}.weight_scale" if weight == "nvfp4" else f"{module}.weight"
            tensors[halved] = (tensors[halved].float() / 2).to(torch.float8_e4m3fn)
            tensors[scale] = tensors[scale] * (2 if scale_doubled else 1)

    return lambda d: edit_tensors(d / "model.safetensors", shrink)


@pytest.mark.parametrize("algo", ["NVFP4", "W4A16_NVFP4", "FP8"])
def test_a_weight_whose_scale_is_not_its_amax_is_a_warning_not_an_error(sources, tmp_path, algo):
    """Max calibration makes the block (NVFP4) or value (FP8) holding a weight's amax exactly 448; fused siblings
    share one scale, so one of them reaching it is enough."""
    directory = write(tmp_path / "ckpt", sources["llama"], algo=algo)
    weight = "fp8" if algo == "FP8" else "nvfp4"
    _halved(weight, f"{LAYER0}.self_attn.o_proj")(directory)
    _halved(weight, f"{LAYER0}.mlp.gate_proj", scale_doubled=False)(directory)  # its sibling up_proj reaches 448
    what = "weight value" if weight == "fp8" else "block scale"
    assert verify(directory)["warnings"] == [
        f"{LAYER0}.self_attn.o_proj: no {what} reaches 448, the top of FP8's range (the largest is 224): "
        + ("weight_scale is not the weight's amax / 448" if weight == "fp8" else
           "weight_scale_2 is not the weight's amax / 2688 (= amax / 6 / 448)")
        + " that max calibration sets (expected only for MSE-searched blocks)"
    ]
    _halved(weight, f"{LAYER0}.mlp.gate_proj", f"{LAYER0}.mlp.up_proj")(directory)
    assert [w.split(":")[0] for w in verify(directory)["warnings"]] == [
        f"{LAYER0}.mlp.{{gate_proj,up_proj}}", f"{LAYER0}.self_attn.o_proj",  # in name order
    ]


@pytest.mark.parametrize("algo", ["NVFP4", "FP8"])
def test_progress_counts_the_bytes_the_checks_read_up_to_their_total(sources, tmp_path, algo):
    directory = write(tmp_path / "ckpt", sources["llama"], algo=algo, shards=3)
    calls = []
    verify(directory, on_progress=lambda done, total: calls.append((done, total)))
    read = sum(t.numel() * t.element_size() for t in load_tensors(directory).values() if t.dtype != torch.uint8)
    assert calls[0] == (0, read) and calls[-1] == (read, read) and len(calls) > 3
    assert all(total == read and a <= b for (a, total), (b, _) in zip(calls, calls[1:]))


def test_not_a_directory(tmp_path):
    assert failure(tmp_path / "nowhere") == f"{tmp_path / 'nowhere'} is not a directory"


@pytest.mark.parametrize("target", ["../outside.safetensors", "/abs/outside.safetensors", "sub/../../outside.safetensors"])
def test_index_paths_outside_the_directory_are_refused_unopened(sources, tmp_path, monkeypatch, target):
    import safetensors

    directory = write(tmp_path / "ckpt", sources["llama"], shards=2)
    outside = tmp_path / "outside.safetensors"
    save_file({"lm_head.weight": torch.zeros(64, 32)}, outside)
    target = str(outside) if target.startswith("/") else target
    _index(lambda m: m.__setitem__("lm_head.weight", target))(directory)
    opened = []
    real_open = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda path, *a, **k: opened.append(Path(path)) or real_open(path, *a, **k))
    message = failure(directory)
    assert f"model.safetensors.index.json names {target!r}, outside the checkpoint directory: refused" in message
    assert opened and all(p.parent == directory for p in opened)
    with pytest.raises(VerificationError, match="outside the checkpoint directory: refused"):
        load_tensors(directory)


def test_shards_linked_to_blobs_elsewhere_verify(sources, tmp_path):
    # the Hugging Face cache's layout: the snapshot directory links each file to a blob
    directory = write(tmp_path / "ckpt", sources["llama"], shards=2)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for shard in directory.glob("*.safetensors"):
        shard.rename(blobs / shard.name)
        shard.symlink_to(blobs / shard.name)
    assert verify(directory)["quantized_modules"] == 2 * LINEARS


def test_a_head_tied_to_the_embedding_must_be_excluded(sources, tmp_path):
    """No lm_head tensor, yet vLLM builds a head: unless the configs exclude it, a quantized one whose scales
    never load (vllm 0.33 model_executor/layers/quantization/modelopt.py is_layer_excluded)."""
    config, tensors = sources["llama"]
    tied = ({**config, "tie_word_embeddings": True}, {n: t for n, t in tensors.items() if n != "lm_head.weight"})
    assert verify(write(tmp_path / "excluded", tied))["excluded"] == ["lm_head"]
    message = failure(write(tmp_path / "not-excluded", tied, exclude=[]))
    assert "lm_head is tied to the embedding and holds no tensor of its own, but the configs do not exclude it" in message
