"""The grouped experts' pieces: the grouped GEMM against the per-expert matmul megatron's expert linears compute
(bit for bit on CPU, which is why the CPU runs it too; within one bf16 ulp on CUDA, on the built-in models' expert
shapes), and one-launch fake quantization of the experts' segments with each quantizer's straight-through
gradient."""

import json

import pytest
import torch

from dist_quant.formats import QuantFormat
from dist_quant.job import CONFIGS
from dist_quant.modules.megatron import _GROUPED_MM, _grouped_linear
from dist_quant.quantizer import (
    QuantizerMode,
    SegmentAmax,
    TensorQuantizer,
    fake_quant_segments,
    segments_calibrate_together,
    segments_quantize_together,
)

COUNTS = [5, 0, 17, 10, 1, 0, 33]  # experts that receive no token included


def _per_expert(x, weights, counts):
    """What megatron's expert linears compute, one expert after another."""
    return torch.cat([torch.matmul(segment, weight.t()) for segment, weight in zip(x.split(counts), weights)])


def _operands(counts, k, n, dtype, device="cpu", seed=0):
    gen = torch.Generator(device).manual_seed(seed)
    x = torch.randn(sum(counts), k, generator=gen, device=device, dtype=dtype)
    weights = torch.randn(len(counts), n, k, generator=gen, device=device, dtype=dtype) / k**0.5
    offsets = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
    return x, weights, offsets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_on_cpu_is_the_per_expert_matmul_bit_for_bit(dtype):
    assert _GROUPED_MM is not None  # torch 2.13 has it: the grouped path is what runs here
    x, weights, offsets = _operands(COUNTS, 64, 96, dtype)
    grad = torch.randn(sum(COUNTS), 96, generator=torch.Generator().manual_seed(1)).to(dtype)
    results = []
    for compute in (lambda x, w: _grouped_linear(x, w, COUNTS, offsets), lambda x, w: _per_expert(x, w, COUNTS)):
        x_, w_ = x.clone().requires_grad_(), weights.clone().requires_grad_()
        out = compute(x_, w_)
        out.backward(grad)
        results.append((out.detach(), x_.grad, w_.grad))
    for grouped, per_expert in zip(*results):
        assert torch.equal(grouped, per_expert)


def test_operands_the_grouped_gemm_cannot_take_run_expert_by_expert():
    x, weights, offsets = _operands(COUNTS, 12, 96, torch.bfloat16)  # rows of 24 bytes: not 16-byte multiples
    assert torch.equal(_grouped_linear(x, weights, COUNTS, offsets), _per_expert(x, weights, COUNTS))
    empty = torch.empty(0, 64)
    assert _grouped_linear(empty, torch.randn(3, 8, 64), [0, 0, 0], torch.zeros(3, dtype=torch.int32)).shape == (0, 8)


def _nvfp4_quantizers(x: torch.Tensor, counts: list[int], block_type: str) -> list[TensorQuantizer]:
    """One NVFP4 quantizer per segment, calibrated on half its segment's values (so that the rest clips)."""
    quantizers = []
    for segment in x.split(counts):
        q = TensorQuantizer(QuantFormat("nvfp4", block_type=block_type))
        q.calibrate_from(segment * 0.5)
        q.mode = QuantizerMode.QUANTIZING
        quantizers.append(q)
    return quantizers


@pytest.mark.parametrize("block_type", ["dynamic", "static"])
def test_segments_fake_quantize_with_each_quantizers_straight_through_gradient(block_type):
    counts = [3, 4, 2]
    x = torch.randn(sum(counts), 32, generator=torch.Generator().manual_seed(2))
    quantizers = _nvfp4_quantizers(x, counts, block_type)
    grad = torch.randn_like(x)
    together, alone = x.clone().requires_grad_(), x.clone().requires_grad_()
    assert segments_quantize_together(quantizers)
    one_launch = fake_quant_segments(quantizers, together, counts)
    one_launch.backward(grad)
    per_quantizer = torch.cat([q(segment) for q, segment in zip(quantizers, alone.split(counts))])
    per_quantizer.backward(grad)
    assert torch.equal(one_launch, per_quantizer) and torch.equal(together.grad, alone.grad)
    assert (together.grad == 0).any() and (together.grad != 0).any()  # clipped values get no gradient


def test_segments_follow_an_amax_changed_in_place_or_replaced():
    """The one launch keeps the role's amax stacked between forwards; a calibration that writes an amax in place,
    or gives a quantizer a new one, is seen at once, also where the amax are views of one buffer (whose shared
    version counter is all that is read)."""
    counts = [3, 4, 2]
    x = torch.randn(sum(counts), 32, generator=torch.Generator().manual_seed(3))
    quantizers = _nvfp4_quantizers(x, counts, "dynamic")
    first = fake_quant_segments(quantizers, x, counts)
    quantizers[1]._amax.mul_(0.25)
    quantizers[2].calibrate_from(x.split(counts)[2] * 0.125)
    changed = fake_quant_segments(quantizers, x, counts)
    assert not torch.equal(first, changed)
    assert torch.equal(changed, torch.cat([q(segment) for q, segment in zip(quantizers, x.split(counts))]))
    # bound as views of one flat buffer (a calibration's sync): a write to any of them, or to the buffer, is seen
    flat = torch.empty(len(quantizers))
    for q, view in zip(quantizers, flat.unbind(0)):
        q.bind_amax(view)
    bound = fake_quant_segments(quantizers, x, counts)
    assert torch.equal(bound, changed)
    for write in (lambda: quantizers[2]._amax.mul_(4.0), lambda: flat[0].fill_(flat[0].item() * 0.5)):
        write()
        written = fake_quant_segments(quantizers, x, counts)
        assert torch.equal(written, torch.cat([q(segment) for q, segment in zip(quantizers, x.split(counts))]))
        assert not torch.equal(written, bound)
        bound = written


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def _calibrating(count: int, device: str) -> list[TensorQuantizer]:
    quantizers = [TensorQuantizer(QuantFormat("nvfp4", block_type="dynamic")).to(device) for _ in range(count)]
    for q in quantizers:
        q.mode = QuantizerMode.CALIBRATING
    return quantizers


def _collect(one_pass: SegmentAmax, x: torch.Tensor, counts: list[int]) -> None:
    lengths = torch.tensor(counts, device=x.device)
    one_pass.collect(x, counts, lengths, torch.cumsum(lengths, 0, dtype=torch.int32))


@pytest.mark.parametrize("device", DEVICES)
def test_segment_amax_is_each_quantizers_max_over_its_segments(device):
    """Over batches whose segments come and go (an expert first reached in the second batch, one never): the
    amax each quantizer collects on its own, bit for bit, no amax for a segment that never had rows; NaN in one
    segment lands in that quantizer's amax only; a second calibration starts afresh and leaves the first's
    amax as they were."""
    batches = [[4, 0, 3, 0], [2, 5, 0, 0], [1, 1, 1, 0]]
    together, alone = _calibrating(4, device), _calibrating(4, device)
    one_pass = SegmentAmax(together)
    gen = torch.Generator().manual_seed(0)
    for number, counts in enumerate(batches):
        x = (torch.randn(sum(counts), 32, generator=gen) * (number + 1)).to(device, torch.bfloat16)
        assert segments_calibrate_together(together)
        _collect(one_pass, x, counts)
        for q, segment in zip(alone, x.split(counts)):
            q(segment)
    for a, b in zip(together, alone):
        assert a.finish_calibration() is b.finish_calibration()
    assert [q.saw_data for q in together] == [True, True, True, False]
    for a, b in zip(together[:3], alone[:3]):
        assert torch.equal(a._amax, b._amax)
    first = [q._amax.clone() for q in together[:3]]
    for q in together:
        q.mode = QuantizerMode.CALIBRATING
    x = torch.ones(3, 32, device=device)
    x[1, 5] = float("nan")
    _collect(one_pass, x, [1, 2, 0, 0])
    assert [q.finish_calibration() for q in together] == [True, True, False, False]
    assert together[0]._amax.item() == 1.0 and together[1]._amax.isnan()
    assert all(torch.equal(q._amax, amax) for q, amax in zip(together[2:3], first[2:3]))  # not reached: as it was


def test_segment_amax_after_every_segment_joined_follows_resets(backend):
    """Once every segment had rows, a batch asks no calibrator (`SegmentAmax.all_joined`): later batches still
    raise each quantizer's amax, and a calibrator reset in between (finish_calibration, a new calibration)
    starts it afresh instead of writing into a view it no longer holds. With the torch reference and with the
    kernel (interpreted; on CUDA the test above runs it compiled)."""
    together, alone = _calibrating(3, "cpu"), _calibrating(3, "cpu")
    one_pass = SegmentAmax(together)
    gen = torch.Generator().manual_seed(1)

    def batch(counts, scale):
        x = torch.randn(sum(counts), 16, generator=gen) * scale
        _collect(one_pass, x, counts)
        for q, segment in zip(alone, x.split(counts)):
            q(segment)

    batch([2, 1, 3], 1.0)
    batch([1, 2, 2], 4.0)  # every segment joined before: the running max alone
    assert [torch.equal(a.calibrator.amax, b.calibrator.amax) for a, b in zip(together, alone)] == [True] * 3
    for q in together + alone:
        q.finish_calibration()
    batch([3, 0, 1], 0.25)  # still calibrating, calibrators reset: what they see now is all they hold
    assert together[1].calibrator.amax is None
    for a, b in zip(together, alone):
        assert a.finish_calibration() is b.finish_calibration() and (a._amax == b._amax).all()


def _builtin_expert_shapes() -> dict[str, tuple[int, int, int, int]]:
    """name -> (experts, top-k, hidden, expert width) of every built-in MoE."""
    shapes = {}
    for path in sorted(CONFIGS.glob("*.json")):
        config = json.loads(path.read_text())
        experts = config.get("num_experts") or config.get("n_routed_experts")
        if experts:
            shapes[path.stem] = (experts, config["num_experts_per_tok"], config["hidden_size"], config["moe_intermediate_size"])
    return shapes


def _ulp_bf16(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 values at each |x| (8 significant bits)."""
    _, exponent = torch.frexp(x.float().abs())
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), exponent - 8)


def grouped_against_per_expert(counts: list[int], k: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bf16 operands on CUDA -> (the grouped GEMM's output, cuBLAS's per-expert products, the bound on their
    distance). Both sum the same K products in float32, each within gamma_K = K u (u = 2^-24) of the exact sum
    times the sum of the products' magnitudes S, so they lie within 2 gamma_K S of each other in float32; each is
    then rounded once to bfloat16, half a bf16 ulp at most: |grouped - per expert| <= 2 K u S + one ulp."""
    x, weights, offsets = _operands(counts, k, n, torch.bfloat16, "cuda")
    grouped, per_expert = _grouped_linear(x, weights, counts, offsets), _per_expert(x, weights, counts)
    magnitudes = _per_expert(x.float().abs(), weights.float().abs(), counts)
    larger = torch.maximum(grouped.float().abs(), per_expert.float().abs())
    return grouped, per_expert, 2 * k * 2.0**-24 * magnitudes + _ulp_bf16(larger)


def _routed_counts(experts: int, top_k: int) -> list[int]:
    """2 x 2048 tokens routed at random over the experts, every seventh expert given none."""
    gen = torch.Generator().manual_seed(0)
    choice = torch.multinomial(torch.ones(experts), 2 * 2048 * top_k, replacement=True, generator=gen)
    counts = torch.bincount(choice, minlength=experts)
    counts[::7] = 0
    return counts.tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's grouped GEMM (run on the GPU machines)")
@pytest.mark.parametrize("model", _builtin_expert_shapes())
def test_grouped_gemm_on_cuda_within_the_float32_summation_bound_of_the_per_expert_matmul(model):
    """Both projections of the model's expert shape: the grouped GEMM and cuBLAS's per-expert products sum in
    other orders; they differ by no more than two float32 sums of the same products can (`grouped_against_per_expert`)."""
    experts, top_k, hidden, width = _builtin_expert_shapes()[model]
    counts = _routed_counts(experts, top_k)
    for k, n in ((hidden, 2 * width), (width, hidden)):  # linear_fc1 (gate and up), linear_fc2
        grouped, per_expert, bound = grouped_against_per_expert(counts, k, n)
        beyond = (grouped.float() - per_expert.float()).abs() > bound
        assert not beyond.any(), f"{model} {k}->{n}: {int(beyond.sum())} values beyond the float32 summation bound"
