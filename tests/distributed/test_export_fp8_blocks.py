"""FP8 128x128 block export (docs/checkpoint.md, "FP8 128x128 blocks"), of a dense Qwen3 and of a Qwen3-MoE with a
dense first layer, both with heads of 128 channels: the engines' native fp8 form exactly, the same bytes at every
layout, dequantizing bit for bit to the weights the calibrated model computes with (read back through dist_quant's
own FP8 block-scaled source reader and through transformers' FineGrainedFP8 dequantization), the weights and
scales ModelOpt 0.47 writes for fp8_pb_wo, the quantized refit stream carrying exactly the checkpoint's tensors
(MXFP8 too), and the verifier naming each planted mistake."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dist_quant.export import VerificationError, load_tensors, verify
from dist_quant.parallel.spawn import run_ranks
from tests.distributed import fp8_block_workers as workers
from tests.e2e.jobs import tiny_checkpoint
from tests.reference.formats import assert_same_bits
from tests.reference.fp8_blocks import transformers_dequantized
from tests.reference.modelopt import modelopt_module

pytestmark = pytest.mark.xdist_group("fp8-block-export")  # one worker computes the module's fixtures
RECIPE = "fp8_block_default-fp8_cast_kv"
# the built-in without its K/V cache entry: a checkpoint transformers and dist_quant's source reader take as it is
NO_KV = {"quantize": {"algorithm": "max", "quant_cfg": [
    {"quantizer_name": "*", "enable": False},
    {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": "e4m3", "block_sizes": {-1: 128, -2: 128}}},
    {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": "e4m3", "block_sizes": {-1: 128, "type": "dynamic"}}},
    {"quantizer_name": "*output_layer*", "enable": False},
    {"quantizer_name": "*router*", "enable": False},
]}}
MXFP8 = "mxfp8_default-fp8_cast_kv"
# heads of 128 channels (Megatron's fused q/k/v rows then split into q_proj's, k_proj's and v_proj's own blocks),
# q/k/v and gate/up rows in whole blocks at TP1 and TP2 (SGLang fuses them), experts' too
WIDTHS = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=128, intermediate_size=256)
MODELS = {
    "dense": ("Qwen3Config", {}),
    "moe": ("Qwen3MoeConfig", dict(moe_intermediate_size=256, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0])),
}
# name -> (model, world, TP, EP, PP, recipe, writers)
LAYOUTS = {
    "dense-tp1": ("dense", 1, 1, 1, 1, RECIPE, "one"), "dense-tp2": ("dense", 2, 2, 1, 1, RECIPE, "one"),
    "moe-tp1": ("moe", 1, 1, 1, 1, RECIPE, "one"), "moe-tp2xep2": ("moe", 4, 2, 2, 1, RECIPE, "all"),
    "moe-pp2xep2": ("moe", 4, 1, 2, 2, RECIPE, "all"),
    "moe-no-kv": ("moe", 1, 1, 1, 1, NO_KV, "one"), "moe-mxfp8": ("moe", 1, 1, 1, 1, MXFP8, "one"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8-blocks")
    sources = {
        name: tiny_checkpoint(root / name, config_class, torch.bfloat16, tie_word_embeddings=False, **WIDTHS, **keys)
        for name, (config_class, keys) in MODELS.items()
    }
    out = {}
    for name, (model, world, tp, ep, pp, recipe, writers) in LAYOUTS.items():
        directory = root / name
        result = run_ranks(world, workers.export_and_streams, str(sources[model]), str(directory), tp, ep, pp, recipe, writers)[0]
        out[name] = (sources[model], directory, result)
    return out


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bytes(a), _bytes(b))


def _linears(tensors: dict) -> list[str]:
    return sorted(n[: -len(".weight")] for n, t in tensors.items() if n.endswith(".weight") and t.dim() == 2 and "embed_tokens" not in n)


@pytest.mark.parametrize("run, excluded, kv", [
    ("dense-tp1", ["lm_head"], "self_attn.k_proj.k_scale"),
    ("moe-tp1", ["lm_head", "model.layers.1.mlp.gate"], "self_attn.attn.k_scale"),
])
def test_the_native_fp8_form_exactly(runs, run, excluded, kv):
    """config.json's quantization_config as DeepSeek-V3's (vLLM 0.33 and SGLang 0.5.23 Fp8Config.from_config), with
    every unquantized linear by name (the router too: vLLM's Qwen3-MoE router is a quantizable linear) and SGLang's
    FP8 KV cache key; no hf_quant_config.json; per quantized linear the weight and its 2-D float32 weight_scale_inv,
    nothing else."""
    source, out, _ = runs[run]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
                  "modules_to_not_convert": excluded, "kv_cache_quant_algo": "FP8"}
    assert not (out / "hf_quant_config.json").exists()
    report = verify(out)
    assert (report["quant_method"], report["quant_algo"], report["kv_cache_quant_algo"], report["warnings"]) == ("fp8", "FP8_PB_WO", "FP8", [])
    tensors, plain = load_tensors(out), load_file(source / "model.safetensors")
    quantized = [m for m in _linears(plain) if m not in excluded]
    expected = {n: (t.dtype, tuple(t.shape)) for n, t in plain.items() if n[: -len(".weight")] not in quantized}
    for module in quantized:
        rows, columns = plain[f"{module}.weight"].shape
        expected[f"{module}.weight"] = (torch.float8_e4m3fn, (rows, columns))
        expected[f"{module}.weight_scale_inv"] = (torch.float32, (-(-rows // 128), -(-columns // 128)))
    for layer in range(2):
        expected |= dict.fromkeys((f"model.layers.{layer}.{kv}", f"model.layers.{layer}.{kv.replace('k', 'v')}"), (torch.float32, ()))
    assert {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()} == expected
    assert report["quantized_modules"] == len(quantized) and any(".experts." in m for m in quantized) == (run == "moe-tp1")


@pytest.mark.parametrize("single, sharded", [("dense-tp1", "dense-tp2"), ("moe-tp1", "moe-tp2xep2"), ("moe-tp1", "moe-pp2xep2")])
def test_the_same_bytes_at_every_layout(runs, single, sharded):
    expected, got = load_tensors(runs[single][1]), load_tensors(runs[sharded][1])
    assert got.keys() == expected.keys()
    assert [n for n, t in expected.items() if not _same(got[n], t)] == []
    assert json.loads((runs[sharded][1] / "config.json").read_text()) == json.loads((runs[single][1] / "config.json").read_text())


@pytest.mark.parametrize("run", ["moe-no-kv", "moe-tp1", "moe-tp2xep2", "moe-pp2xep2", "dense-tp2"])
def test_the_checkpoint_dequantizes_through_the_fp8_source_reader_to_the_fake_quantized_weights(runs, run):
    """dist_quant reads an FP8 block-scaled checkpoint as the bf16 one it stands for (bridge/fp8_source.py, value x
    scale in float32 as DeepSeek's weight_dequant): the export, so read, holds bit for bit the weights the
    calibrated model computes with, at every layout (each rank fake-quantizes its own shard). The K/V cache scales
    an FP8 cache adds (kv_cache_quant_algo) are left unread, as a source's."""
    from dist_quant.bridge import ModelBridge
    from dist_quant.bridge.io import check_checkpoint, source_reader

    exported = runs[run][1]
    bridge = ModelBridge.from_hf(exported)
    reader = source_reader(exported, bridge)
    check_checkpoint(bridge, reader)
    fake, source = runs[run][2]["fake"], load_file(runs[run][0] / "model.safetensors")
    assert sorted(reader.names()) == sorted(fake)
    stored = load_tensors(exported)
    assert bridge.config.fp8_kv_cache == (run != "moe-no-kv") == bool(bridge.kv_scale_names() & stored.keys())
    for name in reader.names():
        assert_same_bits(reader.read(name), fake[name])
    changed = [n for n in reader.names() if not torch.equal(fake[n], source[n])]  # the quantized weights, and only those
    assert sorted(changed) == sorted(n.removesuffix("_scale_inv") for n in stored if n.endswith("_scale_inv"))


def test_transformers_dequantizes_the_checkpoint_to_the_fake_quantized_weights(runs):
    """The outside oracle: transformers 5's FineGrainedFP8 (dequantize=True) loads the export (its experts fused
    per layer) with every weight bit for bit the calibrated model's fake-quantized one."""
    pytest.importorskip("accelerate")  # transformers' FP8 loading needs it
    _, out, result = runs["moe-no-kv"]
    fake = result["fake"]
    compared = 0
    for name, tensor in transformers_dequantized(out).items():
        if name in fake:  # norms aside
            assert_same_bits(tensor, fake[name])
            compared += 1
    assert compared > 10


def test_weights_and_block_scales_are_modelopts_fp8_pb_wo(runs):
    """ModelOpt 0.47's FP8 per-block export of each source weight (FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG: 128x128 block
    amax, get_weight_scaling_factor, to_quantized_weight): the same float8 bytes, and its 4-D weight_scale
    [out/128, 1, in/128, 1], squeezed, is the export's weight_scale_inv bit for bit."""
    mtq = modelopt_module("modelopt.torch.quantization")
    quant_utils = modelopt_module("modelopt.torch.export.quant_utils")
    source, out, _ = runs["moe-tp1"]
    plain, tensors = load_file(source / "model.safetensors"), load_tensors(out)
    modules = [n[: -len(".weight_scale_inv")] for n in tensors if n.endswith(".weight_scale_inv")]
    linears = torch.nn.ModuleList()
    for module in modules:
        rows, columns = plain[f"{module}.weight"].shape
        linear = torch.nn.Linear(columns, rows, bias=False, dtype=torch.bfloat16)
        with torch.no_grad():
            linear.weight.copy_(plain[f"{module}.weight"])
        linears.append(linear)
    mtq.quantize(linears, mtq.FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG,
                 forward_loop=lambda m: [layer(torch.ones(1, layer.in_features, dtype=torch.bfloat16)) for layer in m])
    for module, layer in zip(modules, linears):
        assert quant_utils.get_quantization_format(layer) == "fp8_pb_wo"
        scales = quant_utils.get_weight_scaling_factor(layer)
        assert scales.dim() == 4 and scales.shape[1] == scales.shape[3] == 1, module
        values = quant_utils.to_quantized_weight(plain[f"{module}.weight"], scales.squeeze((1, 3)), "fp8_pb_wo", None, 128)
        assert_same_bits(tensors[f"{module}.weight_scale_inv"], scales.squeeze((1, 3)).float())
        assert _same(tensors[f"{module}.weight"], values), module


@pytest.mark.parametrize("run", ["moe-tp1", "moe-tp2xep2", "moe-mxfp8"])
def test_the_quantized_refit_stream_carries_exactly_the_checkpoints_tensors(runs, run):
    """What NeMo-RL, verl and slime refit an engine with: FP8 blocks as weight + weight_scale_inv, MXFP8 as weight +
    uint8 weight_scale, K/V scales: the checkpoint's tensors, byte for byte, and nothing else."""
    _, out, result = runs[run]
    stream, checkpoint = dict(result["quantized"]), load_tensors(out)
    assert len(stream) == len(result["quantized"]) and stream.keys() == checkpoint.keys()
    assert [n for n, t in checkpoint.items() if not _same(stream[n], t)] == []
    scale = "weight_scale" if run == "moe-mxfp8" else "weight_scale_inv"
    assert stream[f"model.layers.1.mlp.experts.3.down_proj.{scale}"].dtype == (torch.uint8 if run == "moe-mxfp8" else torch.float32)


# -- the verifier against planted mistakes --------------------------------------------------------------------
Q = "model.layers.0.self_attn.q_proj"


def _edit(directory, name, change):
    """Apply `change(tensors)` to the shard holding `name`."""
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    file = index["weight_map"][name]
    tensors = load_file(directory / file)
    change(tensors)
    save_file(tensors, directory / file, metadata={"format": "pt"})
    index["weight_map"] = {n: f for n, f in index["weight_map"].items() if f != file or n in tensors} | dict.fromkeys(tensors, file)
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def _tensor(name, value):
    return lambda d: _edit(d, name, lambda t: t.__setitem__(name, value(t[name])))


def _config(edit):
    def plant(d):
        config = json.loads((d / "config.json").read_text())
        edit(config["quantization_config"])
        (d / "config.json").write_text(json.dumps(config))

    return plant


def _renamed(d):
    _edit(d, f"{Q}.weight_scale_inv", lambda t: t.__setitem__(f"{Q}.weight_scale", t.pop(f"{Q}.weight_scale_inv")))


PLANTED = {
    "bf16-scale": (_tensor(f"{Q}.weight_scale_inv", lambda t: t.bfloat16()), [f"{Q}.weight_scale_inv has dtype torch.bfloat16, expected torch.float32"]),
    "modelopt-4d-scale": (
        _tensor(f"{Q}.weight_scale_inv", lambda t: t[:, None, :, None].contiguous()),
        [f"{Q}.weight_scale_inv has shape [4, 1, 1, 1], expected [4, 1]"],
    ),
    "modelopt-scale-name": (_renamed, [f"{Q}.weight_scale_inv is missing", f"{Q}.weight_scale is not expected"]),
    "input-scale": (
        lambda d: _edit(d, f"{Q}.weight", lambda t: t.__setitem__(f"{Q}.input_scale", torch.tensor(1.0))),
        [f"{Q}.input_scale is not expected by config.json"],
    ),
    "zero-scale": (_tensor(f"{Q}.weight_scale_inv", torch.zeros_like), [f"{Q}.weight_scale_inv holds zero, negative or non-finite scales"]),
    "nan-weight": (
        _tensor(f"{Q}.weight", lambda t: t.view(torch.uint8).clone().fill_(0x7F).view(torch.float8_e4m3fn)),
        [f"{Q}.weight holds NaN bytes"],
    ),
    "hf-quant-config": (
        lambda d: (d / "hf_quant_config.json").write_text("{}"),
        ["hf_quant_config.json is stored, but config.json's quantization_config has quant_method \"fp8\", the native FP8 block form"],
    ),
    "static-activations": (
        _config(lambda qc: qc.__setitem__("activation_scheme", "static")),
        ['config.json: quantization_config.activation_scheme is "static", expected "dynamic"'],
    ),
    "no-fmt": (_config(lambda qc: qc.pop("fmt")), ["config.json: quantization_config.fmt is missing"]),
    "vllm-key": (_config(lambda qc: qc.__setitem__("ignored_layers", [])), ["quantization_config.ignored_layers is not a key of the native fp8 form"]),
    "head-not-excluded": (
        _config(lambda qc: qc.__setitem__("modules_to_not_convert", [])),
        ["lm_head is stored unquantized (torch.bfloat16 weight), but modules_to_not_convert does not name it, so it must be FP8_PB_WO"],
    ),
    "nvfp4-kv": (_config(lambda qc: qc.__setitem__("kv_cache_quant_algo", "NVFP4")), ['kv_cache_quant_algo is "NVFP4", expected "FP8" or none']),
}


@pytest.mark.parametrize("plant, patterns", PLANTED.values(), ids=PLANTED.keys())
def test_the_verifier_names_each_planted_mistake(runs, tmp_path, plant, patterns):
    directory = tmp_path / "ckpt"
    shutil.copytree(runs["dense-tp1"][1], directory)
    plant(directory)
    with pytest.raises(VerificationError) as caught:
        verify(directory)
    assert all(p in str(caught.value) for p in patterns), str(caught.value)


def test_a_scale_larger_than_its_blocks_amax_is_a_warning(runs, tmp_path):
    """Each block's scale is its amax / 448, so its largest value is 448: a doubled scale (the values halved, so
    that it dequantizes alike) is a warning, as for the other formats' scales."""
    directory = tmp_path / "ckpt"
    shutil.copytree(runs["dense-tp1"][1], directory)

    _tensor(f"{Q}.weight", lambda t: (t.float() / 2).to(torch.float8_e4m3fn))(directory)
    _tensor(f"{Q}.weight_scale_inv", lambda t: t * 2)(directory)
    assert verify(directory)["warnings"] == [
        f"{Q}: a block's largest value is 224, not 448: its weight_scale_inv is not the block's amax / 448, the scale "
        "FP8 blocks take"
    ]



E = "model.layers.1.mlp.experts.2.up_proj"


def test_mxfp8_values_are_checked_by_their_format(runs, tmp_path):
    """MXFP8's own checks (NumberFormat.check_values): a NaN scale byte is a problem; a scale one power of two
    above the block's (its values halved, so that it dequantizes alike) is a warning, since 2^ceil(log2(amax / 448))
    puts every block's largest value above 224."""
    nan, larger = tmp_path / "nan", tmp_path / "larger"
    for directory in (nan, larger):
        shutil.copytree(runs["moe-mxfp8"][1], directory)
    assert verify(larger)["warnings"] == []
    _tensor(f"{E}.weight_scale", lambda t: t.clone().fill_(0xFF))(nan)
    with pytest.raises(VerificationError, match=f"{E}.weight_scale holds NaN scales \\(0xFF\\)"):
        verify(nan)
    _tensor(f"{E}.weight", lambda t: (t.float() / 2).to(torch.float8_e4m3fn))(larger)
    _tensor(f"{E}.weight_scale", lambda t: t + 1)(larger)
    [warning] = verify(larger)["warnings"]
    assert warning.startswith(f"{E}: a block's largest value is ") and "below 224: its E8M0 scale is not the smallest power of two" in warning


def test_inspect_describes_the_native_form(runs):
    from tests.e2e.jobs import run_python

    result = run_python("-m", "dist_quant.cli", "inspect", str(runs["moe-tp1"][1]))
    assert result.returncode == 0, result.stderr
    assert f"{runs['moe-tp1'][1]}: FP8_PB_WO weights (the engines' native fp8 form), KV cache FP8" in result.stdout
    assert "not quantized: lm_head, model.layers.1.mlp.gate" in result.stdout
