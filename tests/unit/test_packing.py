"""The packed exchange's local index arithmetic against slicing, and its bucketing."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.models import random_model

from twist_scale.models import architecture_of
from twist_scale.packing import Entry, buckets, held
from twist_scale.subnet import SubnetSampler, axis_of, partitioned_blocks, slice_tensor


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: fused qkv, units in three segments
def test_held_elements_are_exactly_what_slicing_keeps(arch):
    model = random_model(arch)
    ugs = partitioned_blocks(architecture_of(model).unit_blocks(model.config), shared_layers=[])
    spec = SubnetSampler(tuple(ugs), 2, 0.5, seed=3).specs(0)[1]
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    for name, (ug, axis) in axis_of(ugs).items():
        if name not in params:
            continue
        shape = params[name].shape
        numbered = torch.arange(math.prod(shape)).view(shape)
        sub = slice_tensor(numbered, axis, spec.units(ug)).flatten()  # each kept element's full index, in order
        lo, hi = sorted(torch.randint(0, len(numbered.flatten()) + 1, (2,), generator=gen).tolist())
        offsets, index = held(shape, (ug, axis), spec.units(ug), lo, hi)
        in_range = (sub >= lo) & (sub < hi)
        assert torch.equal(offsets + lo, sub[in_range]), name
        assert torch.equal(index, torch.nonzero(in_range).flatten()), name
        assert torch.equal(held(shape, None, None, lo, hi)[0], torch.arange(hi - lo))  # shared: everything


def test_buckets_keep_order_and_size_and_isolate_large_tensors():
    entries = [Entry(f"t{i}", torch.Size([n]), None) for i, n in enumerate([10, 20, 30, 100, 5, 5])]
    got = buckets(entries, bucket_bytes=4 * 40)
    assert [[e.name for e in b] for b in got] == [["t0", "t1"], ["t2"], ["t3"], ["t4", "t5"]]
    assert [e for b in got for e in b] == entries
