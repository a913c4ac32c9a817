"""Max calibration's statistic, a running amax raised by a tensor or by each segment of its rows
(`kernels.update_amax_`, `kernels.update_segment_amax_`): the torch reference and the Triton kernel (the `backend`
fixture runs both; test_kernels_cuda.py runs the compiled kernel) against an independent one, value for value,
with zeros, subnormals, -0.0, Inf and NaN in the data, empty segments, and tiles of rows across segments."""

import math

import pytest
import torch

from dist_quant import kernels
from tests.reference.data import DTYPES, spread


def expected_amax(running: list[float], x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Independent (no amax function of dist_quant's, no vector norm, no segmented reduction): each segment's
    magnitudes in float64 with its running value, NaN if any is NaN, else their plain max."""
    result = []
    for value, part in zip(running, x.double().abs().split(lengths)):
        values = torch.cat([torch.tensor([value], dtype=torch.float64), part.flatten()])
        result.append(math.nan if values.isnan().any() else values.max().item())
    return torch.tensor(result, dtype=torch.float32)


def assert_same_amax(got: torch.Tensor, want: torch.Tensor) -> None:
    assert torch.equal(got.isnan(), want.isnan()), (got, want)
    assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0)), (got, want)


def with_specials(gen: torch.Generator, x: torch.Tensor) -> torch.Tensor:
    """x with zeros, -0.0, subnormals and (in float32 and float16) the largest finite value at random places."""
    specials = torch.tensor([0.0, -0.0, torch.finfo(x.dtype).tiny / 4, -torch.finfo(x.dtype).tiny / 2,
                             torch.finfo(x.dtype).max, -torch.finfo(x.dtype).max]).to(x.dtype)
    flat = x.flatten().clone()
    places = torch.randint(0, flat.numel(), (6,), generator=gen)
    flat[places] = specials
    return flat.view_as(x)


def random_lengths(gen: torch.Generator, rows: int, segments: int) -> list[int]:
    """`segments` lengths summing to rows, about a third of them empty."""
    cuts = sorted(torch.randint(0, rows + 1, (segments - 1,), generator=gen).tolist())
    lengths = [b - a for a, b in zip([0, *cuts], [*cuts, rows])]
    for s in torch.randint(0, segments, (segments // 3,), generator=gen).tolist():  # emptied: rows to a neighbour
        neighbour = (s + 1) % segments
        lengths[neighbour] += lengths[s]
        lengths[s] = 0
    return lengths


def running_around(gen: torch.Generator, data: torch.Tensor, lengths: list[int]) -> list[float]:
    """A running amax per segment, uniform in [0, 1.5 x the segment's own amax]: about a third keep theirs, the
    others are raised (the data spans six decades from row to row)."""
    parts = data.float().abs().split(lengths)
    return [float(torch.rand((), generator=gen)) * 1.5 * (float(p.max()) if p.numel() else 1.0) for p in parts]


def update_segments(running: torch.Tensor, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    tensor = torch.tensor(lengths)
    kernels.update_segment_amax_(running, x, tensor, torch.cumsum(tensor, 0, dtype=torch.int32))
    return running


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (37, 300), (4, 3, 40), (513,)])
def test_tensor_amax_raises_the_running_amax(backend, gen, dtype, shape):
    x = with_specials(gen, spread(gen, shape, dtype)) if math.prod(shape) >= 6 else spread(gen, shape, dtype)
    for start in (0.0, float(x.float().abs().max()) * 2):  # below and above the data's amax
        running = torch.tensor(start)
        kernels.update_amax_(running, x)
        assert_same_amax(running.reshape(1), expected_amax([start], x.reshape(1, -1), [1]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, segments", [(1, 1), (40, 3), (300, 128), (1000, 256), (64, 7)])
def test_segment_amax_raises_each_segments_running_amax(backend, gen, dtype, rows, segments):
    data = spread(gen, (rows, 48), dtype)
    lengths = random_lengths(gen, rows, segments)
    start = running_around(gen, data, lengths)
    x = with_specials(gen, data)
    running = update_segments(torch.tensor(start), x, lengths)
    assert_same_amax(running, expected_amax(start, x, lengths))


def test_nan_and_inf_propagate_and_a_nan_already_held_stays(backend, gen):
    x = spread(gen, (90, 32))
    x[5, 3], x[70, 0] = float("nan"), -float("inf")
    lengths = [10, 40, 0, 40]
    running = update_segments(torch.tensor([0.0, 0.0, float("nan"), 1.0]), x, lengths)
    assert_same_amax(running, torch.tensor([float("nan"), x[10:50].abs().max(), float("nan"), float("inf")]))
    scalar = torch.tensor(float("nan"))
    kernels.update_amax_(scalar, spread(gen, (8, 16)))
    assert scalar.isnan()


def test_rows_with_a_stride_and_in_another_order_than_memory(backend, gen):
    wide = spread(gen, (120, 96))
    x = wide[:, 16:64]  # rows 96 apart
    lengths = random_lengths(gen, 120, 9)
    assert_same_amax(update_segments(torch.zeros(9), x, lengths), expected_amax([0.0] * 9, x, lengths))
    running = torch.tensor(0.0)
    kernels.update_amax_(running, wide.t())  # columns first: copied into rows
    assert_same_amax(running.reshape(1), expected_amax([0.0], wide.reshape(1, -1), [1]))


def test_no_rows_leave_the_running_amax_alone(backend):
    running = torch.tensor([1.0, 2.0])
    update_segments(running, torch.empty(0, 16), [0, 0])
    assert running.tolist() == [1.0, 2.0]


def test_bad_running_amax_raise_one_clear_error(backend):
    x = torch.ones(4, 16)
    with pytest.raises(ValueError, match="running amax must be 2 contiguous float32"):
        kernels.update_segment_amax_(torch.zeros(3), x, torch.tensor([2, 2]), torch.tensor([2, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="row_ends must be int32"):
        kernels.update_segment_amax_(torch.zeros(2), x, torch.tensor([2, 2]), torch.tensor([2, 4]))
