"""A nested run from a pretrained base (one in-process rank, local engine): start-up sorts the base's
units by weight norm, training touches only the prefix, and `--method prefix` exports that prefix."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from helpers import BROWN_VALID, SHAKESPEARE, tiny_args
from helpers.dist import train_on_ranks

from twist_scale.commands.export import main as export_main
from twist_scale.models import architecture_of, build_model, units_to_keep
from twist_scale.pruning.format import SUBNET_FILE
from twist_scale.pruning.pruner import SavedCentral
from twist_scale.startup import fill
from twist_scale.subnet import partitioned_blocks, slice_tensor
from twist_scale.unit_order import sort_units_by_weight_norm


def test_a_nested_run_trains_the_prefix_of_the_sorted_base_and_prefix_exports_it(tmp_path, capsys):
    torch.manual_seed(0)
    base = tmp_path / "base"
    build_model("llama", "tiny", 512).save_pretrained(base)
    out, train, valid = tmp_path / "run", tmp_path / "train.txt", tmp_path / "valid.txt"
    train.write_text(SHAKESPEARE.read_text()[:40_000])  # a small corpus: the run tokenises it in a moment
    valid.write_text(BROWN_VALID.read_text()[:8_000])
    overrides = dict(data__train_files=train, data__valid_files=valid, tracking__enabled="false")
    overrides |= dict(parallel__engine="local", model__pretrained=base, twist__sampling="nested", twist__kappa=0.5)
    overrides |= dict(twist__allow_uncovered="true", twist__shared_layers="none", twist__rounds=2)
    args = tiny_args(out, twist__local_steps=2, twist__correction="none", **overrides)
    train_on_ranks(1, args)

    with torch.device("meta"):
        start = build_model("llama", "tiny", 512, str(base), weights=False)
    unit_blocks = partitioned_blocks(architecture_of(start).unit_blocks(start.config), [])
    fill(
        start,
        seed=0,
        pretrained=str(base),
        arrange=functools.partial(sort_units_by_weight_norm, unit_blocks=unit_blocks),
    )
    begun, trained = dict(start.named_parameters()), dict(SavedCentral.load(out / "final").model.named_parameters())
    for unit_block in unit_blocks:
        keep = units_to_keep(unit_block.num_units, 0.5)
        prefix, rest = torch.arange(keep), torch.arange(keep, unit_block.num_units)
        for axis in unit_block.axes:
            before, after = begun[axis.name].detach(), trained[axis.name].detach()
            assert torch.equal(slice_tensor(after, axis, rest), slice_tensor(before, axis, rest)), axis.name
            assert not torch.equal(slice_tensor(after, axis, prefix), slice_tensor(before, axis, prefix)), axis.name

    export_main([str(out / "final"), "--method", "prefix", "--kappa", "0.5", "--out", str(tmp_path / "exports")])
    record = json.loads((Path(capsys.readouterr().out.split()[0]) / SUBNET_FILE).read_text())
    assert record["kept"] == {
        f"{unit_block.layer}.{unit_block.kind}": list(range(units_to_keep(unit_block.num_units, 0.5)))
        for unit_block in unit_blocks
    }
