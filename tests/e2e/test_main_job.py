"""The README's main job, run as a user would: dist-quant launch, the CLI, a checkpoint that verifies; bad
invocations."""

import json
import re

import pytest

from dist_quant.bridge import ModelBridge
from dist_quant.export import verify

from dist_quant.job import CONFIGS
from tests.e2e.jobs import calibrate_on_ranks, launch, readme_main_command, run_cli, run_python, tiny_checkpoint, tiny_qwen3_moe

def test_readme_main_job_at_small_size(tmp_path):
    """The README's command as it stands there, with fewer and shorter samples, into a directory of the test's."""
    command = readme_main_command()
    assert command[:4] == ["launch", "--nproc-per-node", "4", "calibrate"], command
    out = tmp_path / "tiny-qwen3-moe-nvfp4"
    result = run_python("-m", "dist_quant.cli", *command, "--calib-samples", "8", "--seq-len", "32", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = verify(out)
    assert summary["quant_algo"] == "NVFP4" and summary["kv_cache_quant_algo"] == "FP8"
    for line in ("TP 2 x EP 2 on 4 ranks", "weight quantization error", "experts fc1", "time per stage", f"checkpoint: {out}",
                 "calibration data: the built-in text (dist_quant/data/calibration.txt); bytes (the built-in model's "
                 "byte vocabulary); 8 samples x 32 = 256 tokens"):
        assert line in result.stdout, line
    assert "UserWarning" not in result.stderr  # megatron's optional-dependency warnings stay quiet
    # stderr is a pipe here: plain progress lines, each stage ending with its total, no carriage returns
    assert "\r" not in result.stderr
    for stage in ("building the model: 2 layers, TP 2 x EP 2 on 4 ranks", "reading weights: ", "calibrating: 1/1 batches in ",
                  "writing the last shards and verifying the checkpoint"):
        assert stage in result.stderr, stage
    exported = [line for line in result.stderr.splitlines() if line.startswith("exporting: ")][-1]
    every_tensor = len(ModelBridge.from_hf(CONFIGS / "tiny-qwen3-moe.json").hf_tensor_shapes())  # rank 0 writes all
    assert re.fullmatch(rf"exporting: {every_tensor}/{every_tensor} weights in [\d.]+ s", exported), exported
    # `dist-quant inspect` on it, as the summary suggests: what it verifies, how far it is, OK
    inspected = run_cli("inspect", str(out))
    assert inspected.returncode == 0 and "verify: OK" in inspected.stdout, inspected.stderr
    assert re.fullmatch(rf"verifying {out}: 1 safetensors files, 0\.00 GB\nchecking values: 1/1 MB in [\d.]+ s\n", inspected.stderr)


def test_launch_passes_the_jobs_line_and_exit_status_through():
    """Every rank refuses --out . at startup: one line, exit status 2 (torchrun would exit 1 and add its report)."""
    result = launch(2, "--model", "tiny-qwen3-moe", "--recipe", "nvfp4_default-fp8_cast_kv", "--out", ".")
    assert (result.returncode, result.stderr) == (2, "dist-quant: error: --out . exists: pass --overwrite to replace it\n")


def test_launch_explains_itself_and_checks_the_jobs_usage_before_starting_ranks():
    help_text = " ".join(run_cli("launch", "--help").stdout.split())
    for text in ("--nproc-per-node N", "torchrun --standalone", "exit status 2", "--verbose", "calibrate"):
        assert text in help_text, text
    refused = run_cli("launch", "--nproc-per-node", "2", "calibrate", "--model", "tiny-qwen3-moe")
    assert refused.returncode == 2 and "the following arguments are required: --recipe, --out" in refused.stderr


def test_hf_style_data_file_and_fp8_on_two_ranks(tmp_path):
    data = tmp_path / "calib.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"sample {i}: the quick brown fox {i * i}"}) for i in range(20)))
    out = tmp_path / "fp8"
    result = calibrate_on_ranks(2, "--model", "tiny-qwen3", "--recipe", "fp8_default-fp8_cast_kv", "--tp", "2",
                       "--calib-data", str(data), "--calib-samples", "4", "--seq-len", "16", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert verify(out)["quant_algo"] == "FP8" and "mlp fc1" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--recipe", "nvfp4_defualt"], "no built-in recipe of that name"),
        (["--tp", "2", "--ep", "2"], "world size 1 cannot hold TP=2, PP=1, EP=2, ETP=2"),
        (["--calib-data", "no/such/file.txt"], "--calib-data no/such/file.txt: no such file"),
        (["--out", "."], "--out . exists: pass --overwrite"),
        (["--model", "tiny-gpt5"], "--model tiny-gpt5: unknown; built-in models: deepseek-v3-shape, moe-1b, qwen3-30b-a3b-shape, tiny-qwen3, tiny-qwen3-moe"),
        (["--model", "qwen3-30b-a3b-shape"], "--model qwen3-30b-a3b-shape: 30.5B parameters, too many to write as a random checkpoint first (61 GB from one CPU); add --random-weights"),
        (["--model", "deepseek-v3-shape"], "--model deepseek-v3-shape: 37.0B parameters, too many to write as a random checkpoint first (74 GB from one CPU); add --random-weights"),
        (["--etp", "0"], "--etp must be at least 1"),
        (["--pp", "2"], "world size 1 cannot hold TP=1, PP=2, EP=1, ETP=1"),
        (["--timeout", "0"], "--timeout must be a positive number of minutes"),
    ],
    ids=["unknown-recipe", "world-size", "missing-data", "output-exists", "unknown-model", "big-model-checkpoint", "big-deepseek-checkpoint", "etp-0", "pp-world", "timeout-0"],
)
def test_bad_invocations_fail_with_one_line(tmp_path, args, message):
    base = {"--model": "tiny-qwen3-moe", "--recipe": "nvfp4_default-fp8_cast_kv", "--out": str(tmp_path / "x")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    result = run_cli("calibrate", *[item for pair in base.items() for item in pair])
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("dist-quant: error:") and message in result.stderr


def test_random_weights_drawn_on_the_ranks_need_no_checkpoint(tmp_path):
    # --hf-model with only a config.json (no tokenizer: token ids to calibrate on): nothing else is read, nothing
    # is written but the export
    source = tmp_path / "config-only"
    source.mkdir()
    (source / "config.json").write_text((CONFIGS / "tiny-qwen3-moe.json").read_text())
    ids = tmp_path / "ids.jsonl"
    ids.write_text("\n".join(json.dumps({"input_ids": [(7 * i + j) % 512 for j in range(40)]}) for i in range(4)))
    out = tmp_path / "random"
    result = calibrate_on_ranks(2, "--hf-model", str(source), "--random-weights", "--recipe", "nvfp4_default-fp8_cast_kv",
                                "--ep", "2", "--calib-data", str(ids), "--calib-samples", "4", "--seq-len", "16",
                                "--export-writers", "all", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert verify(out)["quant_algo"] == "NVFP4" and sorted(p.name for p in source.iterdir()) == ["config.json"]
    assert "tokens/s" in result.stdout and "GB/s" in result.stdout
    assert f"calibration data: {ids} (jsonl, column input_ids); token ids as given; 4 samples x 16 = 64 tokens" in result.stdout
    assert "exporting (rank 0's share): " in result.stderr
    # a built-in model the same way: its random checkpoint is never written to the cache
    cache = tmp_path / "cache"
    result = calibrate_on_ranks(2, "--model", "tiny-qwen3-moe", "--random-weights", "--recipe", "nvfp4_default-fp8_cast_kv",
                                "--ep", "2", "--calib-samples", "4", "--seq-len", "16", "--out", str(tmp_path / "builtin"),
                                env={"DIST_QUANT_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert verify(tmp_path / "builtin")["quant_algo"] == "NVFP4" and not (cache.exists() and any(cache.iterdir()))


def test_a_chat_dataset_on_disk_is_calibrated_through_the_chat_template(tmp_path):
    """A dataset directory as `datasets` saves it, its `messages` rendered by the checkpoint's chat template, one
    sample per conversation: the summary names the data, the tokenizer, the samples and tokens."""
    datasets = pytest.importorskip("datasets")
    import torch

    source = tiny_qwen3_moe(tmp_path / "source", torch.float32)
    conversations = [[{"role": "user", "content": f"what is {i} squared?"}, {"role": "assistant", "content": f"{i * i}"}]
                     for i in range(3)]
    data = tmp_path / "chat"
    datasets.Dataset.from_dict({"messages": conversations}).save_to_disk(str(data))
    result = calibrate_on_ranks(1, "--hf-model", str(source), "--recipe", "fp8_default-fp8_cast_kv", "--calib-data", str(data),
                                "--pack", "truncate", "--calib-samples", "4", "--seq-len", "16", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if "calibration data:" in line)
    assert line == (f"  calibration data: saved dataset {data} (3 rows), column messages; the tokenizer of {source} "
                    "(TokenizersBackend); 3 samples x 16 = 48 tokens (--pack truncate, 3 documents; --calib-samples 4 "
                    "asked, the data holds 3)")
    assert "TP 1 x EP 1 on 1 rank, float32" in result.stdout


def test_a_checkpoint_without_a_tokenizer_or_a_hub_id_is_one_line(tmp_path):
    import torch

    source = tiny_qwen3_moe(tmp_path / "source", torch.float32, tokenizer=False)
    result = run_cli("calibrate", "--hf-model", str(source), "--recipe", "fp8_default-fp8_cast_kv", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"dist-quant: error: --hf-model {source} has no tokenizer (")
    assert "give --calib-data of token ids" in result.stderr
    result = run_cli("calibrate", "--hf-model", "Qwen/Qwen3-8B", "--recipe", "fp8_default-fp8_cast_kv", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "--hf-model Qwen/Qwen3-8B: no such directory" in result.stderr
    assert "download it first (hf download Qwen/Qwen3-8B --local-dir DIR) and give --hf-model DIR" in result.stderr


def test_the_help_names_every_architecture():
    from dist_quant.bridge.architectures import ARCHITECTURES

    help_text = " ".join(run_cli("calibrate", "--help").stdout.split())
    assert all(name in help_text for name in ARCHITECTURES) and len(ARCHITECTURES) == 8
    assert "FP8 block-scaled (quant_method fp8, as DeepSeek-V3 ships), whose weights are dequantized on load" in help_text


def test_unquantized_tensors_keep_the_source_dtype(tmp_path):
    """A bfloat16 checkpoint calibrated in float32 (EP2): embeddings, norms, router stay bfloat16, and config.json
    keeps its dtype."""
    import torch
    from safetensors import safe_open

    source = tiny_qwen3_moe(tmp_path / "bf16", torch.bfloat16)
    out = tmp_path / "out"
    result = calibrate_on_ranks(2, "--hf-model", str(source), "--recipe", "nvfp4_default-fp8_cast_kv", "--ep", "2", "--dtype",
                       "float32", "--calib-samples", "4", "--seq-len", "16", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "TP 1 x EP 2 on 2 ranks, float32" in result.stdout
    verify(out)
    exported = {}
    for file in out.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            exported.update({name: f.get_slice(name).get_dtype() for name in f.keys()})
    unquantized = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                   "model.layers.1.mlp.gate.weight", "model.layers.0.input_layernorm.weight",
                   "model.layers.0.self_attn.k_norm.weight"]
    assert {name: exported[name] for name in unquantized} == dict.fromkeys(unquantized, "BF16")
    assert exported["model.layers.0.mlp.experts.3.down_proj.weight"] == "U8"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_the_compute_dtype_defaults_to_the_checkpoints(tmp_path):
    import torch

    from dist_quant.cli import build_parser
    from dist_quant.job import validate

    for dtype, name in ((torch.bfloat16, "bfloat16"), (torch.float32, "float32")):
        source = tiny_qwen3_moe(tmp_path / name, dtype)
        args = build_parser().parse_args(["calibrate", "--hf-model", str(source), "--recipe", "fp8_default-fp8_cast_kv",
                                          "--out", str(tmp_path / f"out-{name}")])
        validate(args)
        assert args.dtype == name


def test_a_config_key_that_cannot_be_honoured_fails_before_any_rank_starts(tmp_path):
    source = tiny_qwen3_moe(tmp_path / "window", __import__("torch").float32, use_sliding_window=True, sliding_window=8)
    result = run_cli("calibrate", "--hf-model", str(source), "--recipe", "fp8_default-fp8_cast_kv", "--seq-len", "16",
                     "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("dist-quant: error: config.json: use_sliding_window = True: a 8-token sliding window")


MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
ARCHITECTURES = {  # name -> (transformers config, its keys, the sharded layout)
    "qwen2": ("Qwen2Config", {}, ("--tp", "2")),
    "mistral": ("MistralConfig", {"sliding_window": 4096}, ("--tp", "2")),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}, ("--ep", "2")),
    "glm4-moe": ("Glm4MoeConfig", {**MOE, "n_routed_experts": 4, "n_group": 1, "topk_group": 1,
                                   "first_k_dense_replace": 1, "n_shared_experts": 1}, ("--ep", "2")),
    "qwen3-moe-mixed": ("Qwen3MoeConfig", {**MOE, "num_experts": 4, "mlp_only_layers": [0]}, ("--ep", "2")),
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_main_job_on_each_architecture(tmp_path, arch):
    import torch
    from safetensors.torch import load_file, save_file

    config_class, keys, layout = ARCHITECTURES[arch]
    source = tiny_checkpoint(tmp_path / "source", config_class, torch.bfloat16, **keys)
    if arch == "glm4-moe":  # as GLM-4.5 ships: a multi-token-prediction layer after the decoder's
        tensors = load_file(source / "model.safetensors")
        tensors |= {"model.layers.2.eh_proj.weight": torch.zeros(64, 128, dtype=torch.bfloat16),
                    "model.layers.2.enorm.weight": torch.ones(64, dtype=torch.bfloat16)}
        save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    result = calibrate_on_ranks(2, "--hf-model", str(source), "--recipe", "nvfp4_default-fp8_cast_kv", *layout,
                      "--calib-samples", "4", "--seq-len", "32", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert verify(out)["quant_algo"] == "NVFP4" and ", bfloat16" in result.stdout
    if arch == "glm4-moe":
        assert "left out: 2 tensors of multi-token-prediction layers" in result.stdout
        assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 0


def test_pipeline_stages_with_an_uneven_split_export_what_one_rank_exports(tmp_path):
    """PP2 x TP2, 3 layers as 2 + 1, every rank writing its share: the weight-derived tensors equal a single
    rank's, byte for byte."""
    import torch

    from dist_quant.export import load_tensors

    source = tiny_checkpoint(tmp_path / "source", "Qwen3Config", torch.float32, num_hidden_layers=3)
    common = ("--hf-model", str(source), "--recipe", "nvfp4_default-fp8_cast_kv", "--calib-samples", "4", "--seq-len", "16")
    single = calibrate_on_ranks(1, *common, "--out", str(tmp_path / "tp1"))
    staged = calibrate_on_ranks(4, *common, "--pp", "2", "--pp-first-layers", "2", "--tp", "2", "--export-writers", "all",
                                "--out", str(tmp_path / "pp2"))
    assert single.returncode == 0 and staged.returncode == 0, staged.stderr[-3000:]
    assert "TP 2 x EP 1 x PP 2 on 4 ranks" in staged.stdout
    one, split = load_tensors(tmp_path / "tp1"), load_tensors(tmp_path / "pp2")
    assert one.keys() == split.keys()
    for name, tensor in one.items():
        if not name.endswith((".input_scale", ".k_scale", ".v_scale")):
            assert torch.equal(tensor.view(-1).view(torch.uint8), split[name].view(-1).view(torch.uint8)), name
