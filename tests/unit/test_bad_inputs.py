"""Inputs that used to end in a traceback, or in one only after the model was built: config.json values the bridge
cannot compute, source tensors of dtypes it does not read, JSON nested beyond Python's recursion limit, tokenizer
files that are not what transformers reads, token ids and text no tensor or tokenizer holds. Each is one error
line (BridgeError / JobError) naming the key, file or data, raised by the function that validates it."""

import json

import pytest
import torch
from safetensors.torch import save_file

from dist_quant.bridge import BridgeError, ModelBridge
from dist_quant.bridge.architectures import parameter_counts
from dist_quant.bridge.config import MAX_COUNT
from dist_quant.bridge.io import SafetensorsReader, check_checkpoint
from dist_quant.bridge.models import read_config
from dist_quant.calibration_data import ByteEncoding, DataSpec, checkpoint_encoding, load
from dist_quant.job import CONFIGS, JobError, builtin_models
from tests.e2e.jobs import byte_tokenizer
from tests.reference.configs import DROP, changed

DEEP = "[" * 100_000 + "]" * 100_000  # far past Python's recursion limit, which json's decoder counts against

QWEN3 = json.loads((CONFIGS / "tiny-qwen3.json").read_text())
QWEN3_MOE = json.loads((CONFIGS / "tiny-qwen3-moe.json").read_text())
GLM4_MOE = {
    "architectures": ["Glm4MoeForCausalLM"], "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "rms_norm_eps": 1e-6, "max_position_embeddings": 128, "n_routed_experts": 8, "num_experts_per_tok": 2,
    "moe_intermediate_size": 32, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "n_shared_experts": 1,
    "norm_topk_prob": True, "partial_rotary_factor": 0.5,
}
MISTRAL = {
    "architectures": ["MistralForCausalLM"], "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 128, "sliding_window": 4096,
}



def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


# config.json -> the start of the one line that refuses it
REFUSED_CONFIGS = {
    "no-query-groups": (changed(QWEN3, num_key_value_heads=0), "num_key_value_heads = 0: expected an integer (query groups) above 0"),
    "query-groups-not-dividing-heads": (changed(QWEN3, num_key_value_heads=3), "num_key_value_heads = 3: expected a divisor of num_attention_heads (4)"),
    "negative-query-groups": (changed(QWEN3, num_key_value_heads=-2), "num_key_value_heads = -2: expected an integer (query groups) above 0"),
    "top-k-above-the-experts": (changed(QWEN3_MOE, num_experts_per_tok=99), "num_experts_per_tok = 99: expected at most the 8 routed experts"),
    "glm-top-k-above-the-experts": (changed(GLM4_MOE, num_experts_per_tok=9), "num_experts_per_tok = 9: expected at most the 8 routed experts"),
    "top-k-beyond-the-groups-chosen": (
        changed(GLM4_MOE, n_group=4, topk_group=2, num_experts_per_tok=5),
        "n_group = 4: top-5 routing over topk_group = 2 of 4 groups of 2 experts: the groups chosen hold 4",
    ),
    "hidden-not-split-by-heads": (
        changed(MISTRAL, hidden_size=66), "num_attention_heads = 4: hidden_size (66) is not a multiple of num_attention_heads (4)",
    ),
    "heads-beyond-the-hidden-size": (
        changed(MISTRAL, num_attention_heads=128, num_key_value_heads=128),
        "num_attention_heads = 128: hidden_size (64) is not a multiple of num_attention_heads (128)",
    ),
    "no-head-size": (changed(QWEN3, head_dim=0), "head_dim = 0: expected an integer (per-head size) above 0"),
    "negative-head-size": (changed(QWEN3, head_dim=-1), "head_dim = -1: expected an integer (per-head size) above 0"),
    "odd-head-size": (changed(QWEN3, head_dim=31), "head_dim = 31: each head rotates 31 of its 31 channels"),
    "odd-rotated-part": (changed(GLM4_MOE, head_dim=18), "head_dim = 18: each head rotates 9 of its 18 channels (head size x partial_rotary_factor 0.5)"),
    "infinite-norm-epsilon": (changed(QWEN3, rms_norm_eps=float("inf")), "rms_norm_eps = inf: expected a number, not inf"),
    "infinite-routed-scaling": (changed(GLM4_MOE, routed_scaling_factor=float("inf")), "routed_scaling_factor = inf: expected a number, not inf"),
    "negative-dense-layers": (changed(GLM4_MOE, first_k_dense_replace=-1), "first_k_dense_replace = -1: expected an integer (leading dense layers) of at least 0"),
    "negative-shared-experts": (changed(GLM4_MOE, n_shared_experts=-1), "n_shared_experts = -1: expected an integer (shared experts, summed into one MLP) of at least 0"),
    "window-of-text": (changed(MISTRAL, sliding_window="4096"), "sliding_window = '4096': the sliding window size must be a number of tokens above 0"),
    "negative-window": (changed(MISTRAL, sliding_window=-1), "sliding_window = -1: the sliding window size must be a number of tokens above 0"),
    "qwen-negative-window": (changed(QWEN3, use_sliding_window=True, sliding_window=-1), "sliding_window = -1: expected an integer or null above 0"),
    "layers-beyond-counting": (changed(QWEN3, num_hidden_layers=2**40), f"num_hidden_layers = {2**40}: expected an integer of at most {MAX_COUNT:,}"),
    "experts-beyond-counting": (changed(QWEN3_MOE, num_experts=2**40), f"num_experts = {2**40}: expected an integer of at most {MAX_COUNT:,}"),
    "rope-factor-of-text": (
        changed(QWEN3, rope_scaling={"rope_type": "yarn", "factor": "x", "original_max_position_embeddings": 64}),
        "rope_scaling = ", "factor = 'x' must be a finite number",
    ),
    "rope-factor-zero": (changed(QWEN3, rope_scaling={"rope_type": "linear", "factor": 0}), "rope_scaling = ", "factor = 0 must be above 0"),
    "llama3-original-length-of-text": (
        changed(QWEN3, architectures=["LlamaForCausalLM"], model_type="llama", head_dim=DROP, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": "8192"}),
        "rope_scaling = ", "original_max_position_embeddings = '8192' must be a finite number",
    ),
    "yarn-mscale-of-text": (
        changed(QWEN3, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": "1"}),
        "rope_scaling = ", "mscale = '1' must be a finite number",
    ),
    "negative-beta": (
        changed(QWEN3, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": -32}),
        "rope_scaling = ", "beta_fast = -32 must be 0 or more",
    ),
    "infinite-rope-theta": (changed(QWEN3, rope_theta=float("inf")), "rope_theta = inf: rope_theta = inf must be a finite number above 1"),
    "vocabulary-beyond-int64": (changed(QWEN3, vocab_size=10**30), f"vocab_size = {10**30}: expected an integer below 2^63"),
    "norm-epsilon-beyond-any-float": (changed(QWEN3, rms_norm_eps=10**400), "rms_norm_eps = 1000", "expected a number below 2^63"),
    "rope-theta-beyond-any-float": (changed(QWEN3, rope_theta=10**400), "rope_theta = 1000", "must be a finite number above 1"),
    "partial-rotary-of-text-alone": (
        changed(GLM4_MOE, partial_rotary_factor="half"), "partial_rotary_factor = 'half': partial_rotary_factor = 'half' must be a number in (0, 1]",
    ),
}


@pytest.mark.parametrize("case", REFUSED_CONFIGS.values(), ids=REFUSED_CONFIGS.keys())
def test_a_config_value_the_bridge_cannot_compute_is_one_line_naming_the_key(case):
    config, *expected = case
    with pytest.raises(BridgeError) as error:
        ModelBridge.from_hf(config, seq_len=64)
    message = _one_line(error)
    assert message.startswith(f"config.json: {expected[0]}"), message
    assert all(part in message for part in expected[1:]), message


def test_values_the_bridge_computes_pass():
    for config in (QWEN3, QWEN3_MOE, GLM4_MOE, MISTRAL, changed(MISTRAL, sliding_window=None),
                   changed(GLM4_MOE, n_group=4, topk_group=2, num_experts_per_tok=4, first_k_dense_replace=99)):
        ModelBridge.from_hf(config, seq_len=64)


LAYOUTS = {  # config, (tp, ep, etp) -> the line
    "vocabulary-not-split-by-tp": (changed(QWEN3, vocab_size=511), (2, 1, None), "vocab_size=511 is not divisible by TP=2"),
    "mlp-not-split-by-tp": (changed(QWEN3, intermediate_size=255), (2, 1, None), "intermediate_size=255 is not divisible by TP=2"),
    "experts-not-split-by-etp": (changed(QWEN3_MOE, moe_intermediate_size=33), (1, 2, 2), "moe_intermediate_size=33 is not divisible by ETP=2"),
    "shared-experts-not-split-by-tp": (changed(GLM4_MOE, moe_intermediate_size=17), (2, 1, 1), "the shared experts' width=17 is not divisible by TP=2"),
}


@pytest.mark.parametrize("case", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_a_width_the_layout_cannot_split_is_refused_before_megatron_asserts(case):
    config, (tp, ep, etp), expected = case
    with pytest.raises(BridgeError) as error:
        ModelBridge.from_hf(config).check_layout(tp, ep, etp=etp)
    assert _one_line(error) == expected


@pytest.mark.parametrize("name", builtin_models())
def test_parameters_counted_without_names_are_the_checkpoints(name):
    bridge = ModelBridge.from_hf(CONFIGS / f"{name}.json")
    counted = sum(parameter_counts(bridge.spec, bridge.config, bridge.forward, bridge.head_dim).values())
    if counted < 5e9:  # listing the names of larger ones is what the count spares
        assert counted == sum(shape.numel() for shape in bridge.hf_tensor_shapes().values())
    assert counted > 0


# -- source dtypes ------------------------------------------------------------------------------------------
def _checkpoint(path, dtype_of_norm: torch.dtype):
    """A real safetensors checkpoint of tiny-qwen3 (zeros), its final norm stored in `dtype_of_norm`."""
    bridge = ModelBridge.from_hf(QWEN3)
    tensors = {name: torch.zeros(shape) for name, shape in bridge.hf_tensor_shapes().items()}
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(dtype_of_norm)
    path.mkdir()
    save_file(tensors, path / "model.safetensors")
    return bridge, SafetensorsReader(path)


@pytest.mark.parametrize(
    "dtype, stored",
    [(torch.uint32, "U32"), (torch.float8_e4m3fn, "torch.float8_e4m3fn"), (torch.float64, "torch.float64"), (torch.int64, "torch.int64")],
    ids=["U32", "F8_E4M3", "F64", "I64"],
)
def test_a_source_tensor_of_a_dtype_not_read_is_one_line_naming_it_and_its_file(tmp_path, dtype, stored):
    bridge, reader = _checkpoint(tmp_path / "model", dtype)
    with pytest.raises(BridgeError) as error:
        check_checkpoint(bridge, reader)
    expected = f"{tmp_path / 'model' / 'model.safetensors'}: model.norm.weight: {stored}, not a dtype dist_quant reads (float32, bfloat16, float16)"
    assert _one_line(error).startswith(expected)
    assert ("quantized already" in str(error.value)) == (dtype == torch.float8_e4m3fn)


def test_the_dtypes_read_pass(tmp_path):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        check_checkpoint(*_checkpoint(tmp_path / str(dtype), dtype))


# -- JSON nested too deep, and files that are not what they should be ----------------------------------------
def test_a_config_json_nested_too_deep_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ' + DEEP + "}")
    with pytest.raises(BridgeError) as error:
        read_config(tmp_path)
    assert _one_line(error) == f"{tmp_path / 'config.json'}: not a JSON config (nested too deep to read)"


def test_a_safetensors_index_nested_too_deep_is_one_line(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": ' + DEEP + "}")
    with pytest.raises(BridgeError) as error:
        SafetensorsReader(tmp_path)
    assert _one_line(error) == f"{tmp_path / 'model.safetensors.index.json'}: not a safetensors index (JSON nested too deep to read)"


def test_a_config_json_integer_of_more_digits_than_python_reads_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"vocab_size": 1' + "0" * 5000 + "}")
    with pytest.raises(BridgeError) as error:
        read_config(tmp_path)
    assert _one_line(error).startswith(f"{tmp_path / 'config.json'}: not a JSON config (Exceeds the limit (4300 digits)")


def test_a_calibration_line_nested_too_deep_is_one_line(tmp_path):
    data = tmp_path / "calib.jsonl"
    data.write_text('{"text": "fine"}\n{"text": ' + DEEP + "}\n")
    with pytest.raises(JobError) as error:
        load(DataSpec(str(data)), ByteEncoding(), 4, 2, "concat", 256)
    assert _one_line(error) == f"--calib-data {data}: line 2 is not JSON that can be read (nested too deep)"


def test_a_calibration_line_of_more_digits_than_python_reads_is_one_line(tmp_path):
    data = tmp_path / "calib.jsonl"
    data.write_text('{"input_ids": [1' + "0" * 5000 + "]}\n")
    with pytest.raises(JobError) as error:
        load(DataSpec(str(data)), ByteEncoding(), 4, 2, "concat", 256)
    assert _one_line(error) == (
        f"--calib-data {data}: line 1 is not JSON that can be read (Exceeds the limit (4300 digits) for integer string "
        "conversion)"
    )


def test_empty_calibration_data_is_one_line():
    with pytest.raises(JobError) as error:
        load(DataSpec(""), ByteEncoding(), 4, 2, "concat", 256)
    assert _one_line(error) == "--calib-data is empty: give a file, a directory or a dataset name"


TOKENIZER_FILES = {  # file, what is written there -> the end of the line
    "tokenizer.json-garbage": ("tokenizer.json", "{garbage", "its tokenizer.json is not JSON (Expecting property name enclosed in double quotes)"),
    "tokenizer.json-nested-too-deep": ("tokenizer.json", DEEP, "its tokenizer.json is not JSON that can be read (nested too deep)"),
    "tokenizer_config.json-garbage": ("tokenizer_config.json", "garbage}", "its tokenizer_config.json is not JSON (Expecting value)"),
    "tokenizer_config.json-nested-too-deep": ("tokenizer_config.json", DEEP, "its tokenizer_config.json is not JSON that can be read (nested too deep)"),
    "tokenizer_config.json-a-list": ("tokenizer_config.json", "[1, 2]", "its tokenizer_config.json is not a JSON object"),
    "tokenizer.json-a-model-tokenizers-rejects": (
        "tokenizer.json", None, "its tokenizer does not load (Exception: data did not match any variant of untagged enum ModelUntagged",
    ),
}


@pytest.mark.parametrize("case", TOKENIZER_FILES.values(), ids=TOKENIZER_FILES.keys())
def test_tokenizer_files_that_do_not_load_are_one_line_naming_the_file(tmp_path, case):
    name, content, expected = case
    byte_tokenizer().save_pretrained(tmp_path)
    if content is None:  # valid JSON, but a model no tokenizer has (tokenizers raises a plain Exception)
        content = json.dumps({**json.loads((tmp_path / name).read_text()), "model": 1})
    (tmp_path / name).write_text(content)
    with pytest.raises(JobError) as error:
        checkpoint_encoding(tmp_path)
    message = _one_line(error)
    assert message.startswith(f"--hf-model {tmp_path}: ") and expected in message, message


def test_a_tokenizer_that_fails_on_the_data_is_one_line_naming_it(tmp_path):
    byte_tokenizer().save_pretrained(tmp_path)
    settings = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**settings, "model_max_length": "long"}))
    data = tmp_path / "calib.txt"
    data.write_text("some text to tokenize\n")
    with pytest.raises(JobError) as error:
        load(DataSpec(str(data)), checkpoint_encoding(tmp_path), 1, 4, "concat", 256)
    assert _one_line(error).startswith(f"the tokenizer of {tmp_path} (") and "fails tokenizing --calib-data (TypeError" in str(error.value)


def test_a_chat_template_that_fails_is_one_line_naming_it(tmp_path):
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = "{{ messages | no_such_filter }}"
    tokenizer.save_pretrained(tmp_path)
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hello"}]}) + "\n")
    with pytest.raises(JobError) as error:
        load(DataSpec(str(data)), checkpoint_encoding(tmp_path), 1, 4, "concat", 256)
    assert "fails rendering --calib-data's chat messages with its chat template (TemplateAssertionError" in _one_line(error)


def test_a_token_id_beyond_any_integer_tensor_is_one_line(tmp_path):
    data = tmp_path / "ids.jsonl"
    data.write_text(json.dumps({"input_ids": [10**23, 1, 2, 3]}) + "\n")
    with pytest.raises(JobError) as error:
        load(DataSpec(str(data)), ByteEncoding(), 1, 4, "concat", 256)
    assert _one_line(error) == f"--calib-data {data}: token id {10**23} is outside the model's vocabulary (vocab_size 256)"


@pytest.mark.parametrize("field", ["text", "messages"])
def test_half_a_surrogate_pair_is_one_line_naming_the_line(tmp_path, field):
    data = tmp_path / "calib.jsonl"
    text = "a lone \\ud800 surrogate"  # JSON's escape for half a UTF-16 pair
    value = f'"{text}"' if field == "text" else f'[{{"role": "user", "content": "{text}"}}]'
    data.write_text(f'{{"{field}": {value}}}\n')
    encoding = checkpoint_encoding(_saved_tokenizer(tmp_path))
    with pytest.raises(JobError) as error:
        load(DataSpec(str(data)), encoding, 1, 4, "concat", 256)
    assert _one_line(error) == f"--calib-data {data}: line 1: its '{field}' holds '\\ud800', half a UTF-16 surrogate pair, which is no text"


def _saved_tokenizer(path):
    byte_tokenizer().save_pretrained(path / "tokenizer")
    return path / "tokenizer"
