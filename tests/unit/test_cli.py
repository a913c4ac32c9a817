"""The dist-quant command's recipes and help (the e2e tests run it in processes of its own)."""

from tests.e2e.jobs import run_cli as _run


def test_recipes_lists_the_builtins():
    result = _run("recipes")
    assert result.returncode == 0 and "nvfp4_default-fp8_cast_kv" in result.stdout


def test_recipe_show_tells_what_each_quantizer_gets():
    result = _run("recipes", "nvfp4_experts_only_mse-fp8_cast_kv")
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if "_quantizer" in line}
    assert "nvfp4 block16 static" in lines["model.layers.0.mlp.experts.0.gate_proj.weight_quantizer"]
    assert lines["model.layers.0.self_attn.q_proj.weight_quantizer"].endswith("off")
    assert "fp8 constant amax 448" in lines["model.layers.0.self_attn.k_bmm_quantizer"]


def test_a_bad_recipe_exits_non_zero_with_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("quantize: {quant_cfg: [{quantizer_name: '*', cfg: {num_bits: 3}}]}")
    result = _run("recipes", str(path))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "cfg.num_bits: 3 is not one of" in result.stderr


def test_help_explains_the_commands():
    result = _run("--help")
    assert result.returncode == 0 and "recipes" in result.stdout


def test_version_names_the_package_version():
    import dist_quant

    result = _run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"dist-quant {dist_quant.__version__}"
