"""How far apart two float computations of the same mathematics may land.

Two implementations of one formula (megatron's forward against transformers', a sharded sum against an unsharded
one, the routing weight multiplied into a linear layer's input or into its output) round differently. Each
rounding is off by at most u = eps / 2 of its result. Along a chain of n roundings the errors add up to n u in
the worst case, and to about sqrt(n) u in practice: for independent rounding errors, Higham and Mary (SIAM J. Sci.
Comput. 41(5), 2019, theorem 2.4) bound the relative error of an inner product by lambda sqrt(n) u, with
probability at least 1 - 2 exp(-lambda^2 (1 - u)^2 / 2), relative to the magnitude of the terms. With lambda = 8 a
value outside the bound has a probability below 1e-13. The magnitude of the terms is taken as the largest
magnitude of the reference; n counts the roundings along the longest dependency chain of the computation
(`transformer_roundings` for a decoder's forward).

A fixed tolerance would be wrong both ways: too tight for large values (logits of magnitude 25 differ by a few
ulps, 1e-5, on a loaded machine's other thread count), and too loose for small ones.
"""

from __future__ import annotations

import math

import torch

LAMBDA = 8.0


def rounding_tolerance(reference: torch.Tensor | float, roundings: int, dtype: torch.dtype = torch.float32) -> float:
    """Absolute tolerance for values of `reference`'s magnitude computed through `roundings` roundings in `dtype`."""
    magnitude = reference.abs().max().item() if isinstance(reference, torch.Tensor) else abs(reference)
    return LAMBDA * math.sqrt(roundings) * (torch.finfo(dtype).eps / 2) * magnitude


def assert_equal_up_to_rounding(actual: torch.Tensor, expected: torch.Tensor, roundings: int, msg: str = "") -> None:
    """The two agree to `rounding_tolerance` of the expected values (elementwise, absolute)."""
    atol = rounding_tolerance(expected, roundings)
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol, msg=lambda default: f"{msg}{default} (atol {atol:.2e} for {roundings} roundings)")


def transformer_roundings(config: dict, seq_len: int) -> int:
    """Roundings along the longest chain of a decoder's forward (HF config keys): per layer, the reductions of the
    two norms (hidden), the QKV projection (hidden), attention scores (head dim), softmax and its weighted sum (the
    sequence, twice), the output projection (heads x head dim), the MLP's two projections (hidden, intermediate)
    and a few elementwise steps; then the final norm and the head (hidden each)."""
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    intermediate = max(config.get(k) or 0 for k in ("intermediate_size", "moe_intermediate_size"))
    per_layer = 3 * hidden + head_dim + 2 * seq_len + config["num_attention_heads"] * head_dim + hidden + intermediate + 8
    return config["num_hidden_layers"] * per_layer + 2 * hidden
