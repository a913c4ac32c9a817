"""Parallel building blocks in one process: reduction domains, sharding, the flat-buffer reducer."""

import pytest
import torch

from dist_quant.parallel.groups import ParallelGroups, _join
from dist_quant.parallel.layout import shard, unshard
from dist_quant.parallel.reduce import AmaxReducer, NonFiniteAmaxError
from dist_quant.formats import FP8, QuantFormat
from dist_quant.quantizer import TensorQuantizer


def test_domains_join_the_groups_they_span():
    tp = [(0, 1), (2, 3)]
    dp = [(0, 2), (1, 3)]
    alone = [(0,), (1,), (2,), (3,)]
    assert _join([dp, tp]) == [(0, 1, 2, 3)]
    assert _join([tp, alone]) == [(0, 1), (2, 3)]
    assert _join([alone]) == [(0,), (1,), (2,), (3,)]


def test_a_single_process_has_no_groups():
    groups = ParallelGroups()
    assert all(group is None for group in groups.domains.values())
    assert groups.size("tp") == 1 and groups.rank("ep") == 0


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [1, 2, 4])
def test_shard_and_unshard_are_inverse(gen, stride, size):
    full = torch.randn(16, 8, generator=gen)
    pieces = [shard(full, 0, rank, size, stride) for rank in range(size)]
    assert torch.equal(unshard(pieces, 0, stride), full)
    if stride == 2 and size == 2:  # rank 1 holds [gate_1; up_1], not rows 8..15
        assert torch.equal(pieces[1], torch.cat([full[4:8], full[12:16]]))
    with pytest.raises(ValueError, match="does not split 3 ways"):
        shard(full, 1, 0, 3)


def test_reducer_binds_views_in_key_order_and_needs_no_collective_alone():
    quantizers = {name: TensorQuantizer(QuantFormat(FP8)) for name in ("b", "a", "c")}
    reducer = AmaxReducer(ParallelGroups())
    for name, q in quantizers.items():
        reducer.register("dp+tp", name, torch.Size([]), q.bind_amax)
    channel = TensorQuantizer(QuantFormat(FP8, axis=0))
    reducer.register(None, "w", torch.Size([3, 1]), channel.bind_amax)
    reducer.allocate()
    for value, name in enumerate("abc", start=1):
        quantizers[name].calibrate_from(torch.tensor([float(value)]))
    assert reducer.arenas["dp+tp"].flat.tolist() == [1.0, 2.0, 3.0]
    reducer.sync()
    assert reducer.collectives == 0
    again = AmaxReducer(ParallelGroups())
    again.register("tp", "x", torch.Size([]), print)
    with pytest.raises(ValueError, match="'x' registered twice in domain 'tp'"):
        again.register("tp", "x", torch.Size([]), print)


def test_non_finite_amax_is_reported_by_name():
    reducer = AmaxReducer(ParallelGroups())
    q = TensorQuantizer(QuantFormat(FP8))
    reducer.register("dp+tp", "layers.0.input_quantizer", torch.Size([]), q.bind_amax)
    reducer.allocate()
    with pytest.raises(RuntimeError, match="register every amax before allocate"):
        reducer.register("dp+tp", "late", torch.Size([]), q.bind_amax)
    q.calibrate_from(torch.tensor([1.0, float("nan")]))
    with pytest.raises(NonFiniteAmaxError, match="amax of layers.0.input_quantizer is not finite"):
        reducer.sync()
