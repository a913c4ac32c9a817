"""What megatron-core (0.16 on CPU, 0.19 on GPU, no Transformer Engine) needs to run here (SPEC.md section 3).

`apply()` is idempotent and changes only what is missing: without Transformer Engine, the MoE router calls
`moe_utils.te_general_gemm`, which exists only when TE imports ("NameError: te_general_gemm"); without CUDA,
megatron allocates on `torch.cuda.current_device()` ("Torch not compiled with CUDA enabled").
"""

from __future__ import annotations

import datetime

import torch


def apply() -> None:
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    if not torch.cuda.is_available():
        torch.cuda.current_device = lambda: "cpu"


def seed(value: int) -> None:
    """Seed torch and megatron's model-parallel RNG trackers (the plain call needs CUDA RNG state)."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(value)
    model_parallel_cuda_manual_seed(value, inference_rng_tracker=not torch.cuda.is_available())


def causal_attention_mask(seq_len: int, device: torch.device | str) -> torch.Tensor:
    """Megatron's boolean mask (True = masked), [1, 1, s, s]; with None it would build one on "cuda"."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(1)[None, None]


def initialize(tp: int = 1, ep: int = 1, etp: int | None = None, timeout: datetime.timedelta | None = None) -> None:
    """Check that the world holds the layout, apply the shims, and initialize megatron's parallel state.
    Needs torch.distributed initialized; ETP defaults to TP. `timeout`: of megatron's groups' collectives
    (megatron's default is 30 minutes)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    etp = tp if etp is None else etp
    world = dist.get_world_size()
    if min(tp, ep, etp) < 1 or world % tp or world % (ep * etp):
        raise ValueError(
            f"world size {world} cannot hold TP={tp}, EP={ep}, ETP={etp}: it must be a multiple of TP and of "
            "EP x ETP"
        )
    apply()
    minutes = {} if timeout is None else {"distributed_timeout_minutes": timeout.total_seconds() / 60}
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp, **minutes
    )
