"""Recipes: built-ins load, resolution order, and every bad recipe fails at load with a useful message."""

import pytest

from dist_quant.formats import DYNAMIC, FP8, NVFP4, STATIC, QuantFormat
from dist_quant.recipe import RecipeError, builtin_recipe_names, load_recipe

SPEC_RECIPES = {
    "fp8_default-fp8_cast_kv",
    "nvfp4_default-fp8_cast_kv",
    "nvfp4_default-nvfp4_cast_kv",
    "nvfp4_default-fp8_kv",
    "nvfp4_experts_only_mse-fp8_cast_kv",
    "nvfp4_mlp_only_mse-fp8_cast_kv",
    "nvfp4_w4a16-fp8_cast_kv",
}
NVFP4_CFG = "{num_bits: e2m1, block_sizes: {-1: 16, type: dynamic, scale_bits: e4m3}}"


def _recipe_file(tmp_path, quant_cfg: str, algorithm: str = "{method: max}"):
    path = tmp_path / "custom.yaml"
    path.write_text(
        "metadata: {recipe_type: ptq, description: test}\n"
        f"quantize:\n  algorithm: {algorithm}\n  quant_cfg:\n{quant_cfg}\n"
    )
    return path


def test_every_spec_recipe_is_built_in():
    assert SPEC_RECIPES <= set(builtin_recipe_names())


@pytest.mark.parametrize("name", builtin_recipe_names())
def test_builtin_recipe_loads_and_quantizes_the_kv_cache(name):
    recipe = load_recipe(name)
    assert recipe.name == name and recipe.description
    k_bmm = recipe.format_for("decoder.layers.0.self_attention.core_attention.k_bmm_quantizer")
    assert k_bmm is not None and k_bmm.use_constant_amax == ("cast" in name)
    assert recipe.format_for("lm_head.weight_quantizer") is None
    assert recipe.format_for("model.layers.0.mlp.gate.weight_quantizer") is None


def test_builtin_recipes_give_the_formats_their_names_promise():
    expert = "model.layers.1.mlp.experts.7.up_proj.weight_quantizer"
    attention = "model.layers.1.self_attn.o_proj.weight_quantizer"
    assert load_recipe("fp8_default-fp8_cast_kv").format_for(attention) == QuantFormat(FP8)
    assert load_recipe("nvfp4_default-fp8_kv").format_for(attention) == QuantFormat(NVFP4, block_type=DYNAMIC)
    experts_only = load_recipe("nvfp4_experts_only_mse-fp8_cast_kv")
    assert experts_only.format_for(attention) is None
    assert experts_only.format_for(expert) == QuantFormat(NVFP4, block_type=STATIC)
    assert experts_only.algorithm.method == "mse" and experts_only.algorithm.fp8_scale_sweep
    weight_only = load_recipe("nvfp4_w4a16-fp8_cast_kv")
    assert weight_only.format_for(attention) == QuantFormat(NVFP4, block_type=DYNAMIC)
    assert weight_only.format_for(attention.replace("weight_quantizer", "input_quantizer")) is None
    mlp_only = load_recipe("nvfp4_mlp_only_mse-fp8_cast_kv")
    assert mlp_only.format_for("model.layers.0.mlp.down_proj.weight_quantizer").block_type == STATIC
    assert mlp_only.format_for("model.layers.0.mlp.shared_expert_gate.weight_quantizer") is None


def test_later_entries_win_and_enable_keeps_the_earlier_cfg(tmp_path):
    path = _recipe_file(
        tmp_path,
        f"""  - {{quantizer_name: "*", enable: false}}
  - {{quantizer_name: "*weight_quantizer", cfg: {NVFP4_CFG}}}
  - {{quantizer_name: "*proj*", cfg: {{num_bits: 8, axis: 0}}}}
  - {{quantizer_name: "*down_proj*", enable: false}}
  - {{quantizer_name: "*down_proj.weight*", enable: true}}""",
    )
    recipe = load_recipe(str(path))
    assert recipe.format_for("a.up_proj.weight_quantizer") == QuantFormat(FP8, axis=0)
    assert recipe.format_for("a.fc.weight_quantizer") == QuantFormat(NVFP4, block_type=DYNAMIC)
    assert recipe.format_for("a.down_proj.input_quantizer") is None
    assert recipe.format_for("a.down_proj.weight_quantizer") == QuantFormat(FP8, axis=0)
    assert recipe.format_for("a.fc.input_quantizer") is None


def test_shared_patterns_are_parsed_and_can_turn_grouping_off(tmp_path):
    entries = '  - {quantizer_name: "*", enable: false}'
    recipe = load_recipe(str(_recipe_file(tmp_path, entries, "{method: max, shared_patterns: {weight: []}}")))
    assert recipe.algorithm.shared_patterns == {"weight": ()}
    pattern = r"(.*)\.(q|k|v)_proj\.weight_quantizer"
    recipe = load_recipe({"quantize": {"algorithm": {"shared_patterns": {"input": [pattern]}}, "quant_cfg": [{"quantizer_name": "*", "enable": False}]}})
    assert recipe.algorithm.shared_patterns == {"input": (pattern,)}
    assert load_recipe(str(_recipe_file(tmp_path, entries))).algorithm.shared_patterns is None


BAD_RECIPES = [
    # (quant_cfg entries, algorithm, expected fragments of the message)
    ('  - {quantizer_name: "*", enabled: false}', "max", ["quant_cfg[0]", "unknown key 'enabled'"]),
    ('  - {quantizer_name: "*w*", cfg: {num_bits: e5m2}}', "max", ["quant_cfg[0] ('*w*').cfg.num_bits", "'e5m2' is not one of"]),
    ('  - {quantizer_name: "*w*", cfg: {num_bits: e2m1, block_sizes: {-1: 32}}}', "max", ["block size must be 16 for e2m1, got 32"]),
    ('  - {quantizer_name: "*w*", cfg: {num_bits: e2m1}}', "max", ["e2m1 needs block_sizes"]),
    ('  - {quantizer_name: "*w*", cfg: {num_bits: e2m1, block_sizes: {-1: 16, type: fixed}}}', "max", ["block_sizes.type", "'fixed'"]),
    ('  - {quantizer_name: "*w*", cfg: {num_bits: e2m1, block_sizes: {-1: 16, scale_bits: e8m0}}}', "max", ["block size must be 32 for MXFP4, got 16"]),
    ('  - {quantizer_name: "*w*", cfg: {num_bits: e2m1, block_sizes: {-1: 16, scale_bits: e5m2}}}', "max", ["scale_bits", "'e5m2'"]),
    ('  - {quantizer_name: "*w*", cfg: {num_bits: e4m3, block_sizes: {-1: 16}}}', "max", ["e4m3 blocks are {-1: 128, -2: 128} (weights)", "got {-1: 16}"]),
    ('  - {quantizer_name: "*w*", cfg: {num_bits: e4m3, block_sizes: {-1: 32, scale_bits: e8m0, type: static}}}', "max", ["block_sizes.type", "'static' is not one of dynamic"]),
    ('  - {quantizer_name: "*w*", cfg: {num_bits: e4m3, use_constant_amax: true, block_sizes: {-1: 32, scale_bits: e8m0}}}', "max", ["use_constant_amax: MXFP8 scales come from each block"]),
    ('  - {quantizer_name: "*w*", cfg: {num_bits: e4m3, axis: 0, block_sizes: {-1: 128, -2: 128}}}', "max", ["axis must be null"]),
    ('  - {quantizer_name: "*w*", cfg: {num_bits: e4m3, block_sizes: [16]}}', "max", ["cfg.block_sizes", "expected a mapping, got list"]),
    ('  - {quantizer_name: "*w*", cfg: {num_bits: e4m3, block_sizes: {-1: 128, group: 2}}}', "max", ["cfg.block_sizes", "unknown key 'group'"]),
    ('  - {quantizer_name: "*w*", cfg: {num_bits: e4m3, bits: 8}}', "max", ["unknown key 'bits'"]),
    ('  - {quantizer_name: "*w*", enable: "no"}', "max", ["quant_cfg[0] ('*w*').enable", "true or false"]),
    ('  - {quantizer_name: "*w*"}', "max", ["needs 'enable', 'cfg' or both"]),
    ('  - {enable: false}', "max", ["quant_cfg[0]", "missing key 'quantizer_name'"]),
    ('  - {quantizer_name: "*", enable: false}', "{method: gptq}", ["algorithm.method", "'gptq' is not one of max, mse"]),
    ('  - {quantizer_name: "*", enable: false}', "{method: max, fp8_scale_sweep: true}", ["fp8_scale_sweep", "needs method mse"]),
    ('  - {quantizer_name: "*", enable: false}', "{method: mse}", ["method mse needs fp8_scale_sweep: true"]),
    ('  - {quantizer_name: "*", enable: false}', "{shared_patterns: {output: ['x']}}", ["algorithm.shared_patterns", "unknown key 'output'"]),
    ('  - {quantizer_name: "*", enable: false}', "{shared_patterns: {weight: ['(q|k']}}", ["shared_patterns.weight", "'(q|k' does not compile"]),
    ('  - {quantizer_name: "*", enable: false}', "{shared_patterns: {weight: 'q_proj'}}", ["expected a list of regular expressions"]),
    ('  - {quantizer_name: "*w*", cfg: {num_bits: e2m1, use_constant_amax: true, block_sizes: {-1: 16, type: static}}}', "max", ["use_constant_amax needs dynamic blocks"]),
]


@pytest.mark.parametrize("entries, algorithm, fragments", BAD_RECIPES)
def test_bad_recipe_fails_at_load_naming_file_entry_and_problem(tmp_path, entries, algorithm, fragments):
    path = _recipe_file(tmp_path, entries, algorithm)
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    message = str(error.value)
    assert message.startswith(f"recipe {path}:")
    for fragment in fragments:
        assert fragment in message, message


def test_structural_errors(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("quantize: [unclosed")
    with pytest.raises(RecipeError, match="invalid YAML"):
        load_recipe(path)
    path.write_text("quantize: {quant_cfg: []}")
    with pytest.raises(RecipeError, match="non-empty list"):
        load_recipe(path)
    path.write_text("metadata: {}\nquantise: {}")
    with pytest.raises(RecipeError, match="unknown key 'quantise'"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="no built-in recipe of that name.*nvfp4_default-fp8_cast_kv"):
        load_recipe("nvfp4_defualt")


def test_an_enabled_quantizer_without_cfg_is_an_error(tmp_path):
    recipe = load_recipe(_recipe_file(tmp_path, '  - {quantizer_name: "*", enable: true}'))
    with pytest.raises(RecipeError, match=r"quant_cfg\[0\] enables 'x.weight_quantizer', but no entry gives it a cfg"):
        recipe.format_for("x.weight_quantizer")


def test_a_binary_recipe_file_is_one_line(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"\x00\xff\xfe binary")
    with pytest.raises(RecipeError, match=r"recipe .*recipe.yaml: not a text file \(YAML expected\)$"):
        load_recipe(path)
    path.write_text("quantize: [1, 2\n")
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    assert "invalid YAML at line 2, column 1" in str(error.value) and "\n" not in str(error.value)
