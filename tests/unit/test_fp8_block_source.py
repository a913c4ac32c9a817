"""FP8 block-scaled source checkpoints (bridge/fp8_source.py): read as the unquantized checkpoints they stand for,
every FP8 weight dequantized bit for bit as DeepSeek's reference does, whole or in the slices tensor- and
expert-tensor-parallel ranks read, for every architecture; transformers' own dequantization agrees; every
quantization_config and checkpoint dist_quant cannot read that way is one line naming the key or the tensor and
its file."""

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from dist_quant.bridge import BridgeError, ModelBridge
from dist_quant.bridge.io import SafetensorsReader, check_checkpoint, source_reader
from dist_quant.bridge.mappings import ShardInfo
from tests.reference.configs import DROP, changed
from tests.reference.fp8_blocks import DEEPSEEK_V3, SCALES_FILE, fp8_checkpoints, transformers_dequantized

# Widths that are no multiples of 128, so that tail blocks are partial, and TP2 slices (96 of 192 query rows,
# 160 of 320 MLP rows) start inside a block
UNALIGNED = dict(vocab_size=160, hidden_size=192, head_dim=48, intermediate_size=320)
COMMON = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              tie_word_embeddings=False)
MOE = dict(num_experts_per_tok=2)
ARCHITECTURES = {  # every architecture the bridge supports: transformers' config class and its keys
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {}),
    "mistral": ("MistralConfig", {"sliding_window": 4096}),
    "mixtral": ("MixtralConfig", {**MOE, "num_local_experts": 4}),
    "qwen3-moe": ("Qwen3MoeConfig", {**MOE, "moe_intermediate_size": 160, "num_experts": 4, "mlp_only_layers": [0]}),
    "glm4-moe": ("Glm4MoeConfig", {**MOE, "moe_intermediate_size": 160, "n_routed_experts": 4, "n_group": 1, "topk_group": 1,
                                   "first_k_dense_replace": 1, "n_shared_experts": 1}),
    # multi-latent attention: q_a_proj [160, 192], kv_a_proj_with_mqa [144 latent + 16 rope, 192], kv_b_proj [320, 144]
    "deepseek-v3": ("DeepseekV3Config", {**MOE, "moe_intermediate_size": 160, "n_routed_experts": 4, "n_group": 1,
                                         "topk_group": 1, "first_k_dense_replace": 1, "n_shared_experts": 1,
                                         "num_key_value_heads": 4, "q_lora_rank": 160, "kv_lora_rank": 144,
                                         "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 48, "head_dim": 16}),
}


def bf16_checkpoint(path, config_class: str, widths: dict = UNALIGNED, **keys):
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**COMMON, **widths, **keys})
    transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Per architecture: (FP8 block-scaled checkpoint, the dequantized bf16 checkpoint it stands for)."""
    made = {}

    def make(arch):
        if arch not in made:
            root = tmp_path_factory.mktemp(arch)
            config_class, keys = ARCHITECTURES[arch]
            made[arch] = fp8_checkpoints(bf16_checkpoint(root / "bf16", config_class, UNALIGNED, **keys), root)
        return made[arch]

    return make


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.int16 if tensor.element_size() == 2 else torch.int32)


def assert_same_bits(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape, what
    assert torch.equal(bits(got), bits(expected)), what


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fp8_weights_read_whole_and_in_shards_equal_the_reference_dequantization_bit_for_bit(checkpoints, arch):
    fp8, reference = checkpoints(arch)
    bridge = ModelBridge.from_hf(fp8, seq_len=64)
    reader, plain = source_reader(fp8, bridge), SafetensorsReader(reference)
    assert bridge.config.fp8_block == (128, 128)
    check_checkpoint(bridge, reader)  # a plain checkpoint: the scales hidden, FP8 weights in bfloat16
    assert sorted(reader.names()) == sorted(plain.names())
    stored = {**load_file(fp8 / "model-00001-of-00002.safetensors")}
    quantized = [name for name in reader.names() if stored[name].dtype == torch.float8_e4m3fn]
    assert len(quantized) > 10 and any(reader.shape(name)[0] % 128 for name in quantized)
    for name in reader.names():
        assert reader.dtype(name) == plain.dtype(name) == torch.bfloat16, name
        assert_same_bits(reader.read(name), plain.read(name), name)
    # what each tensor- / expert-tensor-parallel rank reads, through the architecture's mappings
    names = reader.names()
    groups = {tuple(m.hf_names(m.match_hf(n))): m for m in bridge.mappings() for n in names if m.match_hf(n) is not None}
    for size in (2, 4):
        for rank in range(size):
            info = ShardInfo(tp_rank=rank, tp_size=size, etp_rank=rank, etp_size=size)
            for hf_names, mapping in groups.items():
                try:
                    expected = mapping.load(plain, list(hf_names), info)
                except BridgeError:  # a width that does not split this many ways: the same from the FP8 source
                    with pytest.raises(BridgeError):
                        mapping.load(reader, list(hf_names), info)
                    continue
                assert_same_bits(mapping.load(reader, list(hf_names), info), expected, f"{hf_names} TP{size} rank {rank}")


def test_any_slice_reads_only_its_blocks_and_equals_the_reference(checkpoints, monkeypatch):
    fp8, reference = checkpoints("qwen3")
    reader, plain = source_reader(fp8, ModelBridge.from_hf(fp8)), load_file(reference / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"  # [320, 192]: blocks of rows 0-127, 128-255, 256-319 (partial)
    scale_reads, read = [], reader.reader.read

    def recorded(tensor, *where):  # the file's own read, each scale read recorded
        if tensor.endswith("_scale_inv"):
            scale_reads.append((tensor, *where))
        return read(tensor, *where)

    monkeypatch.setattr(reader.reader, "read", recorded)
    for dim, start, stop, blocks in ((0, 0, 1, (0, 1)), (0, 127, 129, (0, 2)), (0, 100, 300, (0, 3)), (0, 256, 320, (2, 3)),
                                     (0, 160, 160, (1, 2)), (1, 0, 96, (0, 1)), (1, 96, 192, (0, 2)), (1, 130, 131, (1, 2))):
        scale_reads.clear()
        assert_same_bits(reader.read(name, dim, start, stop), plain[name].narrow(dim, start, stop - start), (dim, start, stop))
        assert scale_reads == [(f"{name}_scale_inv", dim, *blocks)], (dim, start, stop)


def test_transformers_dequantizes_the_same_where_blocks_are_whole(tmp_path):
    """The outside oracle: transformers' FineGrainedFP8Config(dequantize=True) on CPU gives the same bf16 weights
    (its fused experts too). At widths that are multiples of 128 only: transformers derives the block from the
    scale grid (rows / scale rows), so it refuses partial tail blocks ("Weight shape (320, 192) not divisible by
    scale grid (3, 2)") or, where the division comes out even, reads other blocks than the checkpoint's."""
    pytest.importorskip("accelerate")  # transformers' FP8 loading needs it
    aligned = dict(vocab_size=160, hidden_size=256, head_dim=64, intermediate_size=384, moe_intermediate_size=128)
    source = bf16_checkpoint(tmp_path / "bf16", "Qwen3MoeConfig", aligned, **MOE, num_experts=4, mlp_only_layers=[0])
    fp8, _ = fp8_checkpoints(source, tmp_path)
    reader = source_reader(fp8, ModelBridge.from_hf(fp8))
    dequantized = transformers_dequantized(fp8)
    for name, tensor in dequantized.items():
        assert_same_bits(tensor, reader.read(name), name)
    assert len(dequantized) > 20


# -- quantization_config ------------------------------------------------------------------------------------
QWEN3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 160, "hidden_size": 192,
         "intermediate_size": 320, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 48, "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16"}


@pytest.mark.parametrize("quantization", [
    DEEPSEEK_V3,  # DeepSeek-V3/R1 and Kimi-K2 as shipped
    {**DEEPSEEK_V3, "scale_fmt": "ue8m0"},  # DeepSeek-V3.1: its activation scales rounded to powers of two
    {"activation_scheme": "dynamic", "modules_to_not_convert": ["lm_head"], "quant_method": "fp8", "weight_block_size": [128, 128]},  # Qwen3 -FP8
    json.loads(transformers.FineGrainedFP8Config().to_json_string()),  # every key transformers writes
    {"quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": ["lm_head"], "weight_block_size": [64, 32]},  # vLLM's names
], ids=["deepseek-v3", "deepseek-v3.1", "qwen3-fp8", "transformers", "vllm-other-block"])
def test_fp8_block_scaled_configs_are_read(quantization):
    bridge = ModelBridge.from_hf(changed(QWEN3, quantization_config=quantization))
    assert bridge.config.fp8_block == tuple(quantization["weight_block_size"])
    assert ModelBridge.from_hf(QWEN3).config.fp8_block is None


@pytest.mark.parametrize("quantization, reason", [
    ({"quant_method": "awq", "bits": 4}, "quant_method 'awq': the checkpoint is already quantized in a form dist_quant does not dequantize"),
    ({"quant_method": "compressed-tensors"}, "quant_method 'compressed-tensors': the checkpoint is already quantized"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "quant_method 'fp8' without weight_block_size: the checkpoint is already quantized per tensor"),
    ("fp8", "expected an object"),
    ({**DEEPSEEK_V3, "weight_block_size": [128]}, "weight_block_size = [128]: expected two positive integers"),
    ({**DEEPSEEK_V3, "weight_block_size": [0, 128]}, "weight_block_size = [0, 128]: expected two positive integers"),
    ({**DEEPSEEK_V3, "weight_block_size": [128.0, 128]}, "expected two positive integers"),
    ({**DEEPSEEK_V3, "fmt": "e5m2"}, "fmt = 'e5m2': expected 'e4m3'"),
    ({**DEEPSEEK_V3, "activation_scheme": "static"}, "activation_scheme = 'static': expected 'dynamic': a static scheme ships activation scales"),
    ({**DEEPSEEK_V3, "expert_dtype": "fp4"}, "expert_dtype = 'fp4': expected 'fp8': FP4-packed experts"),
    ({**DEEPSEEK_V3, "modules_to_convert": ["model.embed_tokens"]}, "FP8 embeddings are not dequantized"),
    ({**DEEPSEEK_V3, "modules_to_not_convert": "lm_head"}, "modules_to_not_convert = 'lm_head': expected a list of module names"),
    ({**DEEPSEEK_V3, "kv_cache_scheme": "fp8"}, "kv_cache_scheme = 'fp8': not a key of FP8 block-scaled checkpoints dist_quant knows"),
], ids=["awq", "compressed-tensors", "per-tensor-fp8", "not-an-object", "one-int-block", "zero-block", "float-block",
        "e5m2", "static", "fp4-experts", "fp8-embeddings", "names-not-a-list", "unknown-key"])
def test_other_quantization_configs_are_one_line_naming_the_key(quantization, reason):
    with pytest.raises(BridgeError) as error:
        ModelBridge.from_hf(changed(QWEN3, quantization_config=quantization))
    message = str(error.value)
    assert "\n" not in message and message.startswith("config.json: quantization_config = ") and reason in message, message


# -- checkpoints that do not hold what an FP8 block-scaled one holds -----------------------------------------
def _broken(fp8, directory, change) -> tuple[ModelBridge, object]:
    """A copy of the FP8 checkpoint with its scales' file changed by `change(weights, scales)` (in place)."""
    shutil.copytree(fp8, directory)
    weights, scales = load_file(directory / "model-00001-of-00002.safetensors"), load_file(directory / SCALES_FILE)
    change(weights, scales)
    save_file(weights, directory / "model-00001-of-00002.safetensors")
    save_file(scales, directory / SCALES_FILE)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    index["weight_map"] = {**dict.fromkeys(weights, "model-00001-of-00002.safetensors"), **dict.fromkeys(scales, SCALES_FILE)}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    bridge = ModelBridge.from_hf(directory)
    return bridge, source_reader(directory, bridge)


UP = "model.layers.1.mlp.up_proj.weight"
SCALE = f"{UP}_scale_inv"
BROKEN = {  # change -> the file named, the start of the message after it, where it is found
    "scale-without-weight": (lambda w, s: s.update({"model.layers.1.mlp.extra.weight_scale_inv": torch.ones(1, 1)}),
                             SCALES_FILE, "model.layers.1.mlp.extra.weight_scale_inv: a block scale without its weight model.layers.1.mlp.extra.weight", "open"),
    "weight-without-scale": (lambda w, s: s.pop(SCALE), "model-00001-of-00002.safetensors",
                             f"{UP}: FP8 without its block scale {SCALE}", "check"),
    "scale-of-a-bf16-tensor": (lambda w, s: s.update({"model.norm.weight_scale_inv": torch.ones(2, 2)}), SCALES_FILE,
                               "model.norm.weight_scale_inv: a block scale of model.norm.weight, which is BF16, not float8_e4m3fn (F8_E4M3)", "check"),
    "misshapen-scale": (lambda w, s: s.update({SCALE: s[SCALE][:2]}), SCALES_FILE,
                        f"{SCALE}: shape (2, 2), expected (3, 2): one scale per 128x128 block of {UP} (320, 192) (config.json's weight_block_size)", "check"),
    "bf16-scale": (lambda w, s: s.update({SCALE: s[SCALE].bfloat16()}), SCALES_FILE, f"{SCALE}: BF16, expected float32 (F32) block scales", "check"),
    "fp8-norm": (lambda w, s: (w.update({"model.norm.weight": w["model.norm.weight"].to(torch.float8_e4m3fn)}),
                               s.update({"model.norm.weight_scale_inv": torch.ones(2)})),
                 "model-00001-of-00002.safetensors", "model.norm.weight: FP8 of shape (192,); block-scaled weights are 2-D", "check"),
    "nan-scale": (lambda w, s: s[SCALE].__setitem__((2, 1), float("nan")), SCALES_FILE, f"{SCALE}: NaN or Inf among the block scales", "load"),
    "inf-scale": (lambda w, s: s[SCALE].__setitem__((0, 0), float("inf")), SCALES_FILE, f"{SCALE}: NaN or Inf among the block scales", "load"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_checkpoint_that_is_not_fp8_block_scaled_as_config_json_says_is_one_line_naming_the_tensor_and_file(checkpoints, tmp_path, case):
    change, file, message, where = BROKEN[case]
    with pytest.raises(BridgeError) as error:
        bridge, reader = _broken(checkpoints("qwen3")[0], tmp_path / case, change)
        if where != "open":
            check_checkpoint(bridge, reader)  # headers: what the job checks at startup
        assert where == "load"
        for name in reader.names():  # values: as the ranks read them
            reader.read(name)
    assert str(error.value) == f"{tmp_path / case / file}: {message}"


def test_an_fp8_checkpoint_whose_config_declares_no_quantization_is_one_line_saying_so(checkpoints, tmp_path):
    fp8, _ = checkpoints("qwen3")
    config = changed(json.loads((fp8 / "config.json").read_text()), quantization_config=DROP)
    bridge = ModelBridge.from_hf(config)
    with pytest.raises(BridgeError) as error:
        check_checkpoint(bridge, source_reader(fp8, bridge))
    assert str(error.value).endswith(
        "which config.json does not describe (the block scales of an FP8 checkpoint, which its quantization_config would declare)"
    )
    # its FP8 weights without their scales: quantized already
    no_scales = tmp_path / "no-scales"
    shutil.copytree(fp8, no_scales, ignore=shutil.ignore_patterns(SCALES_FILE, "*.index.json"))
    (no_scales / "model-00001-of-00002.safetensors").rename(no_scales / "model.safetensors")
    with pytest.raises(BridgeError) as error:
        check_checkpoint(bridge, source_reader(no_scales, bridge))
    assert ": torch.float8_e4m3fn, not a dtype dist_quant reads" in str(error.value) and "quantized already" in str(error.value)
