"""A rewired run on two in-process ranks (ZeRO-1, G = 2, κ = 0.75, correction mean): the importance the ranks
compute from their central shards is the one computed from the whole exported model, the groups share its top
units and still cover every unit, and `--method ranked` at κ = 0.5 exports exactly the units both groups shared."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from helpers import tiny_args
from helpers.dist import run_on_ranks

from twist_scale.commands.export import main as export_main
from twist_scale.importance import fluctuation, unit_importance
from twist_scale.models import architecture_of, units_to_keep
from twist_scale.pruning.format import SUBNET_FILE
from twist_scale.pruning.pruner import SavedCentral
from twist_scale.pruning.scores import output_weight_columns
from twist_scale.subnet import partitioned_blocks


def _train_then_rank(rank: int, world: int, argv: list[str], found: str) -> None:
    from twist_scale.commands import run_config
    from twist_scale.trainer import Trainer

    trainer = Trainer(run_config("twist-train", argv))
    trainer.train()
    importance, specs = trainer.sync.unit_importance(), trainer.specs()  # the round after the last
    if rank == 0:
        torch.save({"importance": importance, "kept": [spec.ids() for spec in specs]}, found)


def test_a_rewired_run_shares_the_ranked_units_and_ranked_exports_them(tmp_path, capsys):
    out, found = tmp_path / "run", tmp_path / "found.pt"
    rewired = dict(twist__sampling="rewired", twist__correction="mean", twist__shared_layers="none")
    args = tiny_args(out, twist__groups=2, twist__kappa=0.75, twist__rounds=2, twist__local_steps=2, **rewired)
    run_on_ranks(_train_then_rank, 2, args + ["--checkpoint.every_rounds", "0"], str(found), group=False)
    ranks = torch.load(found)

    central = SavedCentral.load(out / "final")
    stats = central.training_stats
    blocks = partitioned_blocks(architecture_of(central.model).unit_blocks(central.model.config), [])
    tops = {}
    for block in blocks:
        module = block.output_module
        column_sq = (output_weight_columns(central.model, block) ** 2).sum(0)
        whole = unit_importance(block, fluctuation(column_sq, stats.variance(module)))
        assert torch.allclose(ranks["importance"][block.key], whole, rtol=1e-4, atol=1e-6), block.key
        assert whole.std() > 0, block.key  # the statistics were trained: the ranking means something
        shared = units_to_keep(block.num_units, 0.5)  # core: (2 · 0.75n - n) / 1 units in both groups
        top = tops[f"{block.layer}.{block.kind}"] = sorted(torch.sort(-whole, stable=True).indices[:shared].tolist())
        kept = [set(ids[block.key]) for ids in ranks["kept"]]
        assert set(top) <= kept[0] & kept[1] and kept[0] | kept[1] == set(range(block.num_units)), block.key

    export_main([str(out / "final"), "--method", "ranked", "--kappa", "0.5", "--out", str(tmp_path / "exports")])
    assert json.loads((Path(capsys.readouterr().out.split()[0]) / SUBNET_FILE).read_text())["kept"] == tops
