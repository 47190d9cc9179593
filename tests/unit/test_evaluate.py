"""Perplexity protocol by hand, and the evaluation CLI's messages (a trained run: e2e/test_evaluate_trained.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from helpers import BROWN_VALID
from torch import nn

from twist_scale.commands import evaluate as evaluate_command
from twist_scale.evaluate import KappaResult, perplexity


class Bigram(nn.Module):
    """logits at t = table[token t]: a fixed model whose perplexity can be worked out by hand."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids])


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_perplexity_matches_hand_computation(batch_size):
    table = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    stream = torch.tensor([0, 1, 2, 2, 0, 0, 1, 2])
    # window 3: windows [0 1 2] and [2 0 0]; the tail [1 2] is dropped and no pair crosses a window boundary,
    # so the predicted pairs are 0→1, 1→2 | 2→0, 0→0.
    lse = [math.log(1 + math.e + math.e**2), math.log(math.e + 2), math.log(2 + math.e**3)]
    nll = [lse[0] - 1.0, lse[1] - 0.0, lse[2] - 0.0, lse[0] - 0.0]
    result = perplexity(Bigram(table), stream, window=3, batch_size=batch_size)
    assert result.windows == 2 and result.tokens == 4
    assert result.nll == pytest.approx(sum(nll) / 4, abs=1e-6)
    assert result.ppl == pytest.approx(math.exp(sum(nll) / 4), rel=1e-6)


def test_max_windows_scores_an_evenly_spaced_subset():
    table = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    stream = torch.tensor([0, 1, 2, 2, 0, 0, 1, 2, 1, 1, 0, 2])  # windows of 3: [012] [200] [121] [102]
    model = Bigram(table)
    ends = perplexity(model, torch.tensor([0, 1, 2, 1, 0, 2]), window=3)  # first and last window only
    sub = perplexity(model, stream, window=3, max_windows=2)
    assert (sub.windows, sub.tokens) == (2, 4) and sub.nll == pytest.approx(ends.nll, abs=1e-12)
    assert perplexity(model, stream, window=3, max_windows=9).windows == 4  # more than exist: all of them


def test_perplexity_rejects_bad_windows():
    model = Bigram(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="--window"):
        perplexity(model, torch.zeros(10, dtype=torch.long), window=1)
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, torch.zeros(10, dtype=torch.long), window=11)
    with pytest.raises(ValueError, match="--max_windows"):
        perplexity(model, torch.zeros(10, dtype=torch.long), window=2, max_windows=-1)


def test_spread_over_draws():
    s = KappaResult(0.5, [10.0, 12.0, 14.0], parameters=1, plain=True).summary()
    assert s == {"mean": 12.0, "std": 2.0, "min": 10.0, "max": 14.0}


def test_cli_names_what_to_fix(tmp_path, capsys):
    for args, message in [
        (["--kappa", "1.5"], "--kappa 1.5 must be in (0, 1]"),
        (["--data", str(tmp_path / "nope.txt")], "fix --data"),
        ([], "no config.json"),
    ]:
        with pytest.raises(SystemExit):
            evaluate_command.main([str(tmp_path / "final"), "--data", str(BROWN_VALID), *args, "--no_mlflow"])
        assert message in capsys.readouterr().err
