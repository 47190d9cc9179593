"""The packed exchange's local index arithmetic against slicing, and its bucketing."""

from __future__ import annotations

import pytest
import torch
from helpers.models import random_model

from twist_scale.exchange_plan import Entry, Held, buckets
from twist_scale.models import architecture_of
from twist_scale.subnet import SubnetSampler, axis_of, partitioned_blocks, slice_tensor


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: fused qkv, units in three segments
def test_held_runs_and_positions_are_exactly_what_slicing_keeps(arch):
    model = random_model(arch)
    unit_blocks = partitioned_blocks(architecture_of(model).unit_blocks(model.config), shared_layers=[])
    spec = SubnetSampler(tuple(unit_blocks), (0.5,) * 2, seed=3).specs(0)[1]
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    for name, (unit_block, axis) in axis_of(unit_blocks).items():
        if name not in params:
            continue
        shape = params[name].shape
        entry = Entry(name, shape, (unit_block, axis))
        numbered = torch.arange(entry.numel).view(shape)
        sub = slice_tensor(numbered, axis, spec.units(unit_block)).flatten()  # each kept element's full index, in order
        assert torch.equal(sub, sub.sort().values), f"{name}: the subnet lists elements in full flat order"
        held = Held(entry, spec.units(unit_block))
        for lo, hi in [
            (0, entry.numel),
            *(sorted(torch.randint(0, entry.numel + 1, (2,), generator=gen).tolist()) for _ in range(5)),
        ]:
            assert held.before(lo) == int((sub < lo).sum()), (name, lo)
            expected = torch.isin(torch.arange(lo, hi), sub).nonzero().flatten()
            assert torch.equal(held.positions(lo, hi), expected), (name, lo, hi)
        assert held.before(entry.numel) == len(sub)
    whole = Held(Entry("w", torch.Size([4, 6]), None), None)
    assert whole.before(7) == 7 and whole.positions(3, 9) is None  # shared tensors: every element


def test_unsorted_units_are_refused():
    model = random_model("llama")
    unit_block = partitioned_blocks(architecture_of(model).unit_blocks(model.config), shared_layers=[])[0]
    axis = unit_block.axes[0]
    shape = dict(model.named_parameters())[axis.name].shape
    with pytest.raises(ValueError, match="ascending unit ids"):
        Held(Entry(axis.name, shape, (unit_block, axis)), torch.tensor([1, 0]))


def test_buckets_keep_order_and_size_and_isolate_large_tensors():
    entries = [Entry(f"t{i}", torch.Size([n]), None) for i, n in enumerate([10, 20, 30, 100, 5, 5])]
    got = buckets(entries, bucket_bytes=4 * 40)
    assert [[e.name for e in b] for b in got] == [["t0", "t1"], ["t2"], ["t3"], ["t4", "t5"]]
    assert [e for b in got for e in b] == entries
