"""Random test data that reaches every rounding path."""

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def spread(gen: torch.Generator, shape: tuple, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normal values with log-normal tails and per-row magnitudes over six decades."""
    x = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape, generator=gen))
    row_scale = 10 ** (torch.rand((*shape[:-1], 1), generator=gen) * 6 - 3)
    limit = torch.finfo(dtype).max / 2  # stay finite: float16 overflows at 65504
    return (x * row_scale).clamp(-limit, limit).to(dtype)


E2M1_TIES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def near_ties(gen: torch.Generator, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Values whose quotient by the block scale lands on, or a few ulps beside, an E2M1 tie point, with random
    global amax and block scales: the hardest inputs for a division done through a reciprocal.
    -> (x [rows, 16] float32, global_amax, static block_amax [rows, 1])."""
    global_amax = torch.rand((), generator=gen) * 100 + 0.01
    scale_2 = global_amax / torch.tensor(2688.0)
    e4m3 = torch.randint(1, 127, (rows, 1), generator=gen, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    block_amax = e4m3 * (torch.tensor(6.0) * scale_2)  # rounds back to this E4M3 scale
    ties = torch.tensor(E2M1_TIES)[torch.randint(0, 7, (rows, 16), generator=gen)]
    x = ties * (e4m3 * scale_2)
    steps = torch.randint(-3, 4, (rows, 16), generator=gen)
    for _ in range(3):
        x = torch.where(steps > 0, x.nextafter(torch.tensor(float("inf"))), x)
        x = torch.where(steps < 0, x.nextafter(torch.tensor(0.0)), x)
        steps = steps - steps.sign()
    return x * torch.randn(rows, 16, generator=gen).sign(), global_amax, block_amax
