"""launch/qat_refit_example.py as its docstring runs it: QAT on the built-in MoE (experts fused in the
transformers model it refits into), alone, under torchrun at 2 ranks, and at 4 ranks (EP4, and a dense TP2 x DP2)."""

import contextlib
import importlib.util
import io
import re

import pytest

from dist_quant.parallel.spawn import run_ranks
from tests.e2e.jobs import REPO, run_python

pytestmark = pytest.mark.xdist_group("qat_example")
EXAMPLE = REPO / "launch" / "qat_refit_example.py"
SHORT = ("--steps", "3", "--recalibrate", "1", "--refit", "3")


def _agrees(stdout: str) -> None:
    """The refit after step 3 agreed to float rounding (the example fails above 1e-5 of the largest logit)."""
    assert "step 3" in stdout, stdout
    relative = float(re.search(r"refit: HF vs Megatron logits differ by (\S+) of their largest", stdout).group(1))
    assert relative < 1e-5


def _example():
    spec = importlib.util.spec_from_file_location("qat_refit_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def _example_on_rank(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = _example().main(argv)
    return code, out.getvalue()


def test_alone_on_the_moe():
    """`python launch/qat_refit_example.py`, on a kept rank of its own (a fresh Python costs seconds of imports)."""
    code, stdout = run_ranks(1, _example_on_rank, list(SHORT))[0]
    assert code == 0
    _agrees(stdout)


def test_under_torchrun_at_two_ranks_expert_parallel():
    """Rank 0 alone holds the transformers model; quantizing it must not wait for the other rank."""
    result = run_python("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(EXAMPLE), *SHORT, "--ep", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    _agrees(result.stdout)


@pytest.mark.parametrize("layout", [("--ep", "4"), ("--model", "tiny-qwen3", "--tp", "2")], ids=["moe-ep4", "dense-tp2xdp2"])
def test_at_four_ranks(layout):
    """The example's main on 4 kept gloo ranks (torchrun's own start is tested above). TP2 x DP2 checks the
    gradient rules by hand: q/k norm gradients add up over TP, or the ranks' copies drift apart."""
    results = run_ranks(4, _example_on_rank, [*SHORT, *layout])
    assert [code for code, _ in results] == [0] * 4
    _agrees(results[0][1])


def test_refuses_tensor_parallel_moe_training_in_one_line():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit:
        _example().main(["--tp", "2"])
    assert exit.value.code == 2
    assert "--tp 2: megatron-core trains tiny-qwen3-moe's MoE layers under tensor parallelism" in err.getvalue().splitlines()[-1]
