"""Forward passes of a megatron-core GPT model through megatron's own pipeline schedule, in forward-only mode:
one microbatch per batch, activations passed from stage to stage by megatron, so every stage sees exactly what
it would in the unsplit model. With one stage this is megatron's schedule without pipelining."""

from __future__ import annotations

from typing import Callable

import torch

from dist_quant.parallel.megatron_compat import causal_attention_mask


def forward_only(
    model, batches: list[torch.Tensor], device: torch.device | str, on_batch: Callable[[], object] | None = None,
    keep_logits: bool = True,
) -> list[torch.Tensor]:
    """Run the token batches ([batch, seq], all of one shape: they are the pipeline's microbatches) through the
    model on every rank of the pipeline; `on_batch()` after each (progress). Collective. -> the last stage's
    logits, [batch, seq, vocab / TP] per batch; [] on the other stages, or without `keep_logits` (every batch's
    logits kept to the end: 40 GB for 8 batches of 8 x 2048 tokens over a 152k vocabulary)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not batches:
        return []
    batch, seq = batches[0].shape
    if any(b.shape != batches[0].shape for b in batches):
        raise ValueError(f"microbatches must share one shape, got {sorted({tuple(b.shape) for b in batches})}")
    mask = causal_attention_mask(seq, device)
    positions = torch.arange(seq, device=device)[None].expand(batch, seq)

    def step(data, stage):
        logits = stage(next(data).to(device), positions, mask)
        if on_batch is not None:
            on_batch()
        return logits, lambda output: (output.new_zeros(()), {"logits": output} if keep_logits else {})

    with torch.no_grad():
        stored = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter(batches), model=[model], num_microbatches=len(batches),
            seq_length=seq, micro_batch_size=batch, forward_only=True,
        )
    return [entry["logits"] for entry in stored or []] if keep_logits else []
