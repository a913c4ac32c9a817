"""What megatron-core (0.16 on CPU, 0.19 on GPU, no Transformer Engine) needs to run here (docs/mappings.md).

`apply()` is idempotent and changes only what is missing: without Transformer Engine, the MoE router calls
`moe_utils.te_general_gemm`, which exists only when TE imports ("NameError: te_general_gemm"), and megatron 0.16's
multi-latent attention believes TE present (its TE classes are placeholders) and calls `isinstance` with one
("isinstance() arg 2 must be a type"). Without CUDA:
megatron allocates on `torch.cuda.current_device()`, its pipeline schedules count tokens in
`torch.zeros(..., device="cuda")`, its pipeline point-to-point code calls `torch.cuda.synchronize()`, and the
first and last pipeline stages move their copies of a tied embedding with `.cuda()` before summing them ("Torch
not compiled with CUDA enabled" for all four); on the CPU these mean the CPU and nothing.
"""

from __future__ import annotations

import datetime
import importlib.util
import types

import torch

# Megatron's boolean causal mask, marked so that the core attention of the models dist_quant builds runs fused
# under it: its one home is with that attention.
from dist_quant.modules.megatron import causal_attention_mask  # noqa: F401  (re-exported)


class _TorchOnCpu(types.ModuleType):
    """torch, as seen from megatron's schedules on a machine without CUDA: "cuda" allocations land on the CPU."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)


def apply() -> None:
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    if importlib.util.find_spec("transformer_engine") is None:
        from megatron.core.transformer import multi_latent_attention

        multi_latent_attention.HAVE_TE = False
    if not torch.cuda.is_available():
        torch.cuda.current_device = lambda: "cpu"
        torch.cuda.synchronize = lambda device=None: None
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
        schedules.torch = _TorchOnCpu("torch")


def seed(value: int) -> None:
    """Seed torch and megatron's model-parallel RNG trackers (the plain call needs CUDA RNG state)."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(value)
    model_parallel_cuda_manual_seed(value, inference_rng_tracker=not torch.cuda.is_available())


def layout_problem(world: int, tp: int = 1, ep: int = 1, etp: int | None = None, pp: int = 1) -> str | None:
    """Why `world` ranks cannot hold the layout: world = TP x PP x DP, and EP x ETP divides world / PP (experts
    spread over the data- and tensor-parallel ranks of a stage). None when they can."""
    etp = tp if etp is None else etp
    if min(tp, ep, etp, pp) < 1:
        return "TP, EP, ETP and PP must be at least 1"
    if world % (tp * pp) or (world // pp) % (ep * etp):
        return (
            f"world size {world} cannot hold TP={tp}, PP={pp}, EP={ep}, ETP={etp}: it must be a multiple of TP x PP, "
            "and world / PP a multiple of EP x ETP"
        )
    return None


def initialize(
    tp: int = 1, ep: int = 1, etp: int | None = None, timeout: datetime.timedelta | None = None, pp: int = 1
) -> None:
    """Check that the world holds the layout, apply the shims, and initialize megatron's parallel state.
    Needs torch.distributed initialized; ETP defaults to TP. `timeout`: of megatron's groups' collectives
    (megatron's default is 30 minutes)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    problem = layout_problem(dist.get_world_size(), tp, ep, etp, pp)
    if problem:
        raise ValueError(problem)
    apply()
    minutes = {} if timeout is None else {"distributed_timeout_minutes": timeout.total_seconds() / 60}
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
        expert_tensor_parallel_size=tp if etp is None else etp, **minutes,
    )
