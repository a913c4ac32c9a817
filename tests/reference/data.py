"""Random test data that reaches every rounding path."""

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def spread(gen: torch.Generator, shape: tuple, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normal values with log-normal tails and per-row magnitudes over six decades."""
    x = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape, generator=gen))
    row_scale = 10 ** (torch.rand((*shape[:-1], 1), generator=gen) * 6 - 3)
    limit = torch.finfo(dtype).max / 2  # stay finite: float16 overflows at 65504
    return (x * row_scale).clamp(-limit, limit).to(dtype)
