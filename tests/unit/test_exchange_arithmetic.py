"""The packed exchange's index arithmetic, for every group at once, against slicing; and its buckets."""

from __future__ import annotations

import pytest
import torch
from helpers.models import random_model

from twist_scale.exchange.entries import Entry, buckets, plan_buckets
from twist_scale.exchange.held import HeldGroups, unit_masks
from twist_scale.exchange.runs import SLICE_AT, expand_ranges, gather_runs, take
from twist_scale.models import AxisSlice, UnitBlock, architecture_of
from twist_scale.subnet import SubnetSampler, axis_of, partitioned_blocks, slice_tensor


@pytest.mark.parametrize("kappas", [(0.5, 0.25, 1.0), (0.5, 0.5, 0.5)])  # groups of unequal and equal widths
@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: fused qkv, units in three segments
def test_held_runs_and_piece_rows_are_exactly_what_slicing_keeps(arch, kappas):
    model = random_model(arch)
    unit_blocks = partitioned_blocks(architecture_of(model).unit_blocks(model.config), shared_layers=[])
    specs = SubnetSampler(tuple(unit_blocks), kappas, seed=3).specs(0)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    for name, (unit_block, axis) in axis_of(unit_blocks).items():
        if name not in params:
            continue
        shape = params[name].shape
        numel = shape.numel()
        masks = unit_masks(unit_block, [s.units(unit_block) for s in specs])
        assert torch.equal(specs[0].drawn[unit_block.key], masks)  # the sampler's draw, which the exchange reads
        held = HeldGroups(shape, (unit_block, axis), masks, 3)
        numbered = torch.arange(numel).view(shape)
        subs = [slice_tensor(numbered, axis, s.units(unit_block)).flatten() for s in specs]  # full index of each kept
        assert all(torch.equal(sub, sub.sort().values) for sub in subs), f"{name}: subnets list in full flat order"
        assert held.total.tolist() == [len(sub) for sub in subs]
        cuts = [(0, numel), *(sorted(torch.randint(0, numel + 1, (2,), generator=gen).tolist()) for _ in range(5))]
        for lo, hi in cuts:
            assert held.before(torch.tensor([lo, hi])).tolist() == [
                [int((sub < c).sum()) for c in (lo, hi)] for sub in subs
            ]
            rows = held.piece_rows(lo, hi)
            expected = [torch.isin(torch.arange(lo, hi), sub).nonzero().flatten() for sub in subs]
            assert rows.counts.tolist() == [len(e) for e in expected], (name, lo, hi)
            assert torch.equal(rows.select(torch.arange(lo, hi)) - lo, torch.cat(expected)), (name, lo, hi)
            holders = sum(torch.isin(torch.arange(lo, hi), sub).long() for sub in subs)
            placed = rows.padded(torch.zeros(hi - lo, dtype=torch.long))
            rows.add_to(placed, torch.ones(int(rows.counts.sum()), dtype=torch.long))
            assert torch.equal(rows.unpadded(placed), holders), (name, lo, hi)
            every = rows.padded(torch.zeros(hi - lo, dtype=torch.long)) + rows.holder_counts
            assert torch.equal(rows.unpadded(every), holders), (name, lo, hi)
    whole = HeldGroups(torch.Size([4, 6]), None, None, 2)
    assert whole.before(torch.tensor([7])).tolist() == [[7], [7]] and whole.piece_rows(3, 9) is None


def test_a_unit_axis_out_of_unit_order_is_refused():
    block = UnitBlock(0, "attn", 2, (AxisSlice("w", 0, segments=((2, 1), (0, 1))),), "o", 1)  # unit 0 after unit 1
    with pytest.raises(ValueError, match="ascending unit order"):
        HeldGroups(torch.Size([4, 3]), (block, block.axes[0]), torch.ones(1, 2, dtype=torch.bool), 1)


def test_expand_ranges_is_the_concatenation_of_aranges_and_take_copies_only_when_it_must():
    starts, lengths = torch.tensor([[5, 0], [9, 2]]), torch.tensor([[3, 0], [1, 2]])
    assert expand_ranges(starts, lengths).tolist() == [5, 6, 7, 9, 2, 3]
    assert expand_ranges(torch.tensor([4]), torch.tensor([-1])).numel() == 0
    source = torch.arange(10.0)
    assert take(source, torch.tensor([0, 7, 4]), torch.tensor([4, 0, 6])) is source  # all of it, in order
    assert take(source, torch.tensor([4, 0]), torch.tensor([6, 4])).tolist() == [4, 5, 6, 7, 8, 9, 0, 1, 2, 3]


def test_buckets_keep_order_and_size_and_isolate_large_tensors():
    entries = [Entry(f"t{i}", torch.Size([n]), None) for i, n in enumerate([4, 3, 2, 30, 100, 5, 1, 12, 9])]
    got = buckets(entries, 4 * 40, lambda e: e.numel)  # 40 elements; 10 or more travel alone
    assert [[e.name for e in b] for b in got] == [["t0", "t1", "t2"], ["t3"], ["t4"], ["t5", "t6"], ["t7"], ["t8"]]
    assert [e for b in got for e in b] == entries


def test_plan_cuts_what_a_rank_moves_not_the_full_tensor_into_bucket_sized_parts():
    """A 400-element tensor over 4 owners (pieces of 100) of which each rank moves 50: a 64-byte bucket
    (16 elements) cuts every piece into 4 parts of 25, each the same sub-range of every owner's piece."""
    big, small = Entry("big", torch.Size([400]), None), Entry("small", torch.Size([8]), None)
    per_rank = {"big": 50, "small": 2}
    got = plan_buckets([small, big], 64, lambda key: -(-400 // 4) if key == "big" else 2, lambda e: per_rank[e.name])
    parts = [e.part for b in got for e in b if e.name == "big"]
    assert parts == [(0, 25), (25, 50), (50, 75), (75, 100)]
    assert [len(b) for b in got] == [1, 1, 1, 1, 1]  # each 50-byte part (a quarter of a bucket or more) alone


@pytest.mark.parametrize("run", [1, SLICE_AT])  # short runs through one index, long ones slice by slice
def test_gather_runs_lays_out_each_ranks_runs_of_every_source_in_rank_order(run):
    sources = [torch.arange(4.0 * run), 100 + torch.arange(2.0 * run)]
    starts = torch.tensor([[0, run], [2 * run, 0]])  # rank 0: source 0 [0, run), source 1 [run, 2 run); rank 1: ...
    lengths = torch.tensor([[run, run], [2 * run, run]])
    expected = torch.cat([sources[0][:run], sources[1][run:], sources[0][2 * run :], sources[1][:run]])
    assert torch.equal(gather_runs(sources, starts, lengths), expected)
