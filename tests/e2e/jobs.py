"""Running the job as a user does, for the end-to-end tests."""

import contextlib
import io
import os
import shlex
import subprocess
import sys
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[2]
FAULTS = REPO / "tests" / "e2e" / "faults"  # faults injected into a job's ranks (its sitecustomize)


def run_python(*args, timeout=600, env=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


def launch(ranks, *args, verbose=False, fault=None, **kwargs):
    """`dist-quant launch --nproc-per-node RANKS calibrate ARGS` (the rendezvous takes a port the system gives it,
    so that concurrent jobs never meet). `fault`: (kind, rank) of a real fault in that rank, see
    tests/e2e/faults/sitecustomize.py."""
    env = None
    if fault is not None:
        path = os.pathsep.join(filter(None, [str(FAULTS), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path, "DIST_QUANT_TEST_FAULT": ":".join(map(str, fault))}
    return run_python(
        "-m", "dist_quant.cli", "launch", "--nproc-per-node", str(ranks), *(["--verbose"] if verbose else []),
        "calibrate", *args, env=env, **kwargs,
    )


def readme_main_command() -> list[str]:
    """The arguments of the README's main command, `dist-quant ARGS`."""
    text = (REPO / "README.md").read_text()
    line = next(line for block in text.split("```bash\n")[1:] for line in block.split("```")[0].splitlines() if "dist-quant launch" in line)
    return shlex.split(line.split("&&")[-1])[1:]


def calibrate_on_ranks(ranks: int, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    """The job as `torchrun --nproc-per-node RANKS -m dist_quant.cli calibrate ARGS` runs it, from the CLI's main
    down, on kept gloo ranks (dist_quant.parallel.spawn) instead of fresh processes whose imports cost more than
    these jobs (the README's command itself runs under `dist-quant launch`, in test_readme_main_job_at_small_size,
    and so do the tests of faults in test_reliability). `env`:
    variables set on the ranks for the job. -> the worst rank's exit status, what the ranks printed."""
    from dist_quant.parallel.spawn import run_ranks

    results = run_ranks(ranks, _cli_on_rank, ["calibrate", *args], env or {})
    return subprocess.CompletedProcess(
        ["dist-quant", "calibrate", *args], max(code for code, _, _ in results),
        "".join(out for _, out, _ in results), "".join(err for _, _, err in results),
    )


def _cli_on_rank(argv: list[str], env: dict) -> tuple[int, str, str]:
    from dist_quant import cli

    out, err = io.StringIO(), io.StringIO()
    with mock.patch.dict(os.environ, env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def run_cli(*args) -> subprocess.CompletedProcess:
    """`python -m dist_quant.cli ARGS` for a command that must end before any rank starts (a refused invocation,
    --help, recipes): `dist_quant.cli.main` in this process, its exit status and what it printed. (A Python of
    its own costs seconds of imports.) Reaching the job itself fails the test."""
    from dist_quant import cli, job

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), mock.patch.object(
        job, "run", side_effect=AssertionError("the invocation was accepted and the job would start")
    ):
        try:
            code = cli.main(list(args))
        except SystemExit as exit_:  # argparse: --help, or a usage error
            code = exit_.code
    return subprocess.CompletedProcess(["dist-quant", *args], code, out.getvalue(), err.getvalue())


TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)


CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"


def byte_tokenizer():
    """A real tokenizer over TINY's 256-token vocabulary: byte-level BPE without merges (one token per UTF-8 byte,
    token id = byte value), byte 0 as its EOS token, and a chat template."""
    import tokenizers
    import transformers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    characters = bytes_to_unicode()
    model = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={characters[b]: b for b in range(256)}, merges=[]))
    model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    model.decoder = tokenizers.decoders.ByteLevel()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=model, eos_token=characters[0])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_checkpoint(path: Path, config_class: str, dtype, tokenizer: bool = True, **config) -> Path:
    """A checkpoint transformers writes for a tiny model of `config_class` (random weights), with the byte
    tokenizer unless `tokenizer` is False."""
    import torch
    import transformers

    torch.manual_seed(0)
    hf_config = getattr(transformers, config_class)(**{**TINY, **config})
    transformers.AutoModelForCausalLM.from_config(hf_config).to(dtype).save_pretrained(path)
    if tokenizer:
        byte_tokenizer().save_pretrained(path)
    return path


def tiny_qwen3_moe(path: Path, dtype, **config) -> Path:
    return tiny_checkpoint(path, "Qwen3MoeConfig", dtype, **{"moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2, **config})


def readme_blocks() -> list[str]:
    """The README's Python blocks, in order."""
    text = (REPO / "README.md").read_text()
    return [block.split("```", 1)[0] for block in text.split("```python\n")[1:]]


def run_blocks_on_rank(blocks: list[str], directory: str) -> dict:
    """Run README blocks in order in one namespace, in `directory` (where they write out/...). -> what the test
    checks, on this rank."""
    os.chdir(directory)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    return {
        "hf": sorted(namespace.get("hf", {})),
        "out": None if namespace.get("out") is None else str(namespace["out"]),
        "bucket": sorted(namespace.get("tensors", {})),
    }
