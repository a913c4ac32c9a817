"""Every Python block of the README runs as written: the plain torch ones in this process, the sharded ones in
order on 4 gloo ranks (TP2 x EP2), as a user following the README would run them."""

import torch

from dist_quant.export import verify
from dist_quant.parallel.spawn import run_ranks
from tests.e2e.jobs import readme_blocks, run_blocks_on_rank


def _split() -> tuple[list[str], list[str]]:
    blocks = readme_blocks()
    first_sharded = next(i for i, b in enumerate(blocks) if "megatron_compat.initialize" in b)
    return blocks[:first_sharded], blocks[first_sharded:]


def test_the_plain_torch_blocks_run():
    local, sharded = _split()
    assert len(local) == 2 and len(sharded) == 4
    namespace: dict = {}
    for block in local:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    assert isinstance(namespace["fresh"], torch.nn.Module)


def test_the_sharded_blocks_run_on_four_ranks(tmp_path):
    _, sharded = _split()
    ranks = run_ranks(4, run_blocks_on_rank, sharded, str(tmp_path))
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in ranks[0]["hf"] and ranks[1]["hf"] == []
    assert ranks[0]["out"].endswith("out/readme-nvfp4") and verify(tmp_path / "out/readme-nvfp4")["quant_algo"] == "NVFP4"
    shares = [set(rank["bucket"]) for rank in ranks]  # each rank's last bucket (TP rank 1 holds no first piece)
    assert sum(bool(share) for share in shares) >= 2 and not set.intersection(*[s for s in shares if s])
