"""The Triton kernels compiled for a real GPU (run on the device machine; skipped without CUDA), bit for bit
against the independent reference. The interpreter covers the same kernels on CPU in test_nvfp4.py."""

import pytest
import torch

from dist_quant.kernels import nvfp4_fake_quant, nvfp4_quantize, use_triton
from dist_quant.numerics import fp8_fake_quant
from tests.reference import formats as ref
from tests.reference.data import DTYPES, near_ties, spread

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _edge_cases() -> torch.Tensor:
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    tie_block = torch.cat([torch.tensor([6.0]), ties, -ties, torch.tensor([100.0])])
    subnormal_scales = torch.linspace(-1, 1, 16) * 6 * 2.0**-9 * 3.5
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40] + [1.0] * 10)
    past_float32 = torch.tensor([3e38, -3e38, 1e30, 1.0] * 4)  # x / scale overflows for small global amax
    return torch.stack([tie_block, subnormal_scales, special, torch.zeros(16), past_float32])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(300, 32), (8192, 4096), (3, 7, 64)])
@pytest.mark.parametrize("blocks", ["dynamic", "static"])
def test_kernels_on_cuda_match_reference(gen, dtype, shape, blocks):
    x = spread(gen, shape, dtype)
    global_amax = x.float().abs().max()
    block_amax = None
    if blocks == "static":
        block_amax = x.float().reshape(*shape[:-1], -1, 16).abs().amax(-1) * (torch.rand(1, generator=gen) + 0.5)
    expected = ref.nvfp4(x, global_amax, block_amax)
    cuda = lambda t: None if t is None else t.cuda()  # noqa: E731
    assert use_triton(x.cuda())
    ref.assert_same_bits(nvfp4_fake_quant(x.cuda(), global_amax.cuda(), cuda(block_amax)).cpu(), expected["fake_quant"])
    packed, block_scale, scale_2 = nvfp4_quantize(x.cuda(), global_amax.cuda(), cuda(block_amax))
    assert torch.equal(packed.cpu(), ref.pack_codes(expected["codes"]))
    assert torch.equal(block_scale.cpu().view(torch.uint8), expected["scale_codes"].to(torch.uint8))
    ref.assert_same_bits(scale_2.cpu(), expected["scale_2"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("global_amax", [2688.0, 1e-30, 1e-6, 1e30, 0.0])
def test_edge_cases_on_cuda_match_reference(dtype, global_amax):
    x = _edge_cases().to(dtype)
    g = torch.tensor(global_amax)
    expected = ref.nvfp4(x, g)["fake_quant"]
    ref.assert_same_bits(nvfp4_fake_quant(x.cuda(), g.cuda()).cpu(), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_and_torch_reference_on_cuda_match_reference(gen, dtype, monkeypatch):
    # torch on CUDA divides by a Python scalar through its reciprocal: the numerics must not depend on that.
    x = spread(gen, (512, 64), dtype)
    amax = x.float().abs().max() * torch.rand((), generator=gen).add(0.5)
    ref.assert_same_bits(fp8_fake_quant(x.cuda(), amax.cuda()).cpu(), ref.fp8_fake_quant(x, amax))
    monkeypatch.setenv("DIST_QUANT_BACKEND", "torch")
    ref.assert_same_bits(nvfp4_fake_quant(x.cuda(), amax.cuda()).cpu(), ref.nvfp4(x, amax)["fake_quant"])


def test_quotients_beside_tie_points_on_cuda(gen):
    x, global_amax, block_amax = near_ties(gen, 1 << 16)
    expected = ref.nvfp4(x, global_amax, block_amax)
    actual = nvfp4_fake_quant(x.cuda(), global_amax.cuda(), block_amax.cuda()).cpu()
    ref.assert_same_bits(actual, expected["fake_quant"])


@pytest.mark.parametrize("shape, dtype", [((300, 64), torch.bfloat16), ((7, 3, 160), torch.float32)])
def test_mse_sweep_on_cuda_matches_reference(gen, shape, dtype):
    from dist_quant.kernels import nvfp4_mse_block_amax
    from dist_quant.numerics.mse import nvfp4_mse_block_amax as reference_sweep

    w = spread(gen, shape, dtype)
    g = w.float().abs().max()
    assert torch.equal(nvfp4_mse_block_amax(w.cuda(), g.cuda()).cpu(), reference_sweep(w, g))



def _misaligned(x: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of x whose data pointer is not 16-byte aligned (Triton specializes on that)."""
    flat = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    view = flat[1:].view(x.shape)
    view.copy_(x)
    assert view.data_ptr() % 16
    return view


def test_direct_launches_match_reference_in_every_argument_class(gen, monkeypatch):
    """The first launch of each argument class goes through Triton (compiling it), the second through the kernel
    compiled for that class: exact for 1, a multiple of 16 and other block counts, misaligned inputs and static
    block amax, whatever class was launched before."""
    from dist_quant.kernels import nvfp4_triton

    nvfp4_triton._fake_quant.cache_clear()  # launchers that have compiled nothing yet
    triton_runs = []
    run = nvfp4_triton._nvfp4_fake_quant_kernel.run
    monkeypatch.setattr(nvfp4_triton._nvfp4_fake_quant_kernel, "run", lambda *a, **k: triton_runs.append(1) or run(*a, **k))
    cases = []
    for rows, cols in [(1, 16), (16, 16), (5, 48), (64, 256)]:
        x = spread(gen, (rows, cols), torch.bfloat16).cuda()
        for data in (x, _misaligned(x)):
            for static in (False, True):
                cases.append((data, data.float().reshape(rows, -1, 16).abs().amax(-1) if static else None))
    for x, block_amax in cases:
        global_amax = x.float().abs().max() * 1.5
        expected = ref.nvfp4(x.cpu(), global_amax.cpu(), None if block_amax is None else block_amax.cpu())["fake_quant"]
        for _ in range(2):
            ref.assert_same_bits(nvfp4_fake_quant(x, global_amax, block_amax).cpu(), expected)
    # 3 block-count classes (1, multiples of 16: 16 and 1024 blocks, other) x alignment x static: once each
    assert len(triton_runs) == 12


def _expert_rows(gen, equal: bool) -> list[int]:
    """An MoE layer's 128 segments: its experts' weights (equal: the kernels' parts) or tokens (some have none)."""
    if equal:
        return [48] * 128
    rows = torch.randint(0, 40, (128,), generator=gen).tolist()
    rows[3] = rows[100] = 0
    return rows


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocks", ["dynamic", "static"])
@pytest.mark.parametrize("equal", [False, True], ids=["tokens", "weights"])
def test_segments_on_cuda_match_one_fake_quant_per_segment(gen, dtype, blocks, equal):
    """128 segments (an MoE layer's experts: its tokens, some empty, or its equal weights), one with a global amax
    small enough that its programs divide, against the reference per segment."""
    from dist_quant.kernels import nvfp4_fake_quant_segments

    rows = _expert_rows(gen, equal)
    x = spread(gen, (sum(rows), 64), dtype)
    global_amax = torch.stack([p.float().abs().amax() if p.numel() else torch.tensor(1.0) for p in x.split(rows)])
    global_amax *= torch.rand(128, generator=gen) + 0.5
    global_amax[7] = 1e-31
    block_amax = x.float().reshape(len(x), -1, 16).abs().amax(-1) if blocks == "static" else None
    parts = block_amax.split(rows) if block_amax is not None else [None] * len(rows)
    expected = torch.cat([ref.nvfp4(p, g, b)["fake_quant"] for p, g, b in zip(x.split(rows), global_amax, parts)])
    cuda = lambda t: None if t is None else t.cuda()  # noqa: E731
    ref.assert_same_bits(nvfp4_fake_quant_segments(x.cuda(), global_amax.cuda(), rows, cuda(block_amax)).cpu(), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocks", ["dynamic", "static"])
@pytest.mark.parametrize("equal", [False, True], ids=["tokens", "weights"])
def test_segment_quantize_and_dequantize_on_cuda_match_the_reference(gen, dtype, blocks, equal):
    """An MoE layer's experts quantized in one launch for export: every byte as the reference gives it per
    segment, and the dequantize kernel returns the reference's values (and the fake quant's)."""
    from dist_quant.kernels import nvfp4_dequantize, nvfp4_fake_quant_segments, nvfp4_quantize_segments

    rows = _expert_rows(gen, equal)
    x = spread(gen, (sum(rows), 64), dtype)
    global_amax = torch.stack([p.float().abs().amax() if p.numel() else torch.tensor(1.0) for p in x.split(rows)])
    global_amax *= torch.rand(128, generator=gen) + 0.5
    global_amax[7] = 1e-31
    block_amax = x.float().reshape(len(x), -1, 16).abs().amax(-1) if blocks == "static" else None
    parts = block_amax.split(rows) if block_amax is not None else [None] * len(rows)
    expected = [ref.nvfp4(p, g, b) for p, g, b in zip(x.split(rows), global_amax, parts)]
    cuda = lambda t: None if t is None else t.cuda()  # noqa: E731
    packed, scale, scale_2 = nvfp4_quantize_segments(x.cuda(), global_amax.cuda(), rows, cuda(block_amax))
    assert torch.equal(packed.cpu(), torch.cat([ref.pack_codes(e["codes"]) for e in expected]))
    assert torch.equal(scale.view(torch.uint8).cpu(), torch.cat([e["scale_codes"] for e in expected]).to(torch.uint8))
    dequantized = nvfp4_dequantize(packed, scale, scale_2, dtype, rows).cpu()
    parts = zip(packed.cpu().split(rows), scale.view(torch.uint8).cpu().split(rows), scale_2.cpu())
    ref.assert_same_bits(dequantized, torch.cat([ref.dequantize(*p) for p in parts]).to(dtype))
    fake = nvfp4_fake_quant_segments(x.cuda(), global_amax.cuda(), rows, cuda(block_amax)).cpu()
    ref.assert_same_bits(dequantized, fake)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, columns, segments", [(32768, 2048, 128), (32768, 768, 128), (4096, 1024, 256), (300, 48, 7)])
def test_running_amax_on_cuda_matches_the_reference(gen, dtype, rows, columns, segments):
    """The calibrating forward's amax launches on an MoE layer's expert inputs (the 30B shape's fc1 and fc2
    widths, a DeepSeek-V3 layer's 256 experts) and on one tensor, against per-segment maxima on the CPU."""
    from dist_quant.kernels import update_amax_, update_segment_amax_
    from tests.unit.test_amax import assert_same_amax, expected_amax, random_lengths, running_around, with_specials

    data = spread(gen, (rows, columns), dtype)
    lengths = random_lengths(gen, rows, segments)
    start = running_around(gen, data, lengths)
    x = with_specials(gen, data)
    x[rows // 3, 5] = float("nan")
    running, counts = torch.tensor(start).cuda(), torch.tensor(lengths)
    update_segment_amax_(running, x.cuda(), counts.cuda(), torch.cumsum(counts, 0, dtype=torch.int32).cuda())
    assert_same_amax(running.cpu(), expected_amax(start, x, lengths))
    with_nan, without = torch.tensor(0.5, device="cuda"), torch.tensor(0.5, device="cuda")
    update_amax_(with_nan, x[:, 1:].cuda())  # rows with a stride
    update_amax_(without, x.nan_to_num(0.0).cuda())
    assert with_nan.isnan().item()
    assert without.item() == max(0.5, x.nan_to_num(0.0).float().abs().max().item())
