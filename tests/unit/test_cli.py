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


def test_inspect_says_what_it_verifies_and_an_error_has_a_line_of_its_own(tmp_path):
    missing = tmp_path / "missing"
    result = _run("inspect", str(missing))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [f"verifying {missing}: 0 safetensors files, 0.00 GB",
                                          f"dist-quant: error: {missing} is not a directory"]


def test_an_export_error_names_out_as_the_user_gave_it_not_the_temporary_directory(tmp_path, monkeypatch):
    from dist_quant.export import OutputTarget, VerificationError, verify
    from dist_quant.job import named_for_user

    monkeypatch.chdir(tmp_path)
    target = OutputTarget("out/model")
    partial = target.claim()
    try:
        try:
            verify(partial)  # an empty directory, as the verifier sees a failed export
        except VerificationError as error:
            named = named_for_user(error, target)
        assert str(partial) not in str(named) and type(named) is VerificationError
        assert str(named).startswith("out/model: ") and "config.json is missing" in str(named)
    finally:
        target.release()
