"""Perplexity protocol by hand, what a sweep scores, test-set names, and the evaluation CLI's messages (a trained
run: loop/test_evaluate_trained.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from helpers import BROWN_VALID
from helpers.pruning import VOCAB, pruner, tiny_llama
from torch import nn

from twist_scale.commands import evaluate as evaluate_command
from twist_scale.evaluate import KappaResult, perplexity, sweep
from twist_scale.metric_names import default_test_set


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
        (["--test_set", "a", "--test_set", "b"], "2 --test_set for 1 --data"),
        (["--data", str(BROWN_VALID)], "two test sets are named 'brown': name each with --test_set"),
        (["--test_set", "brown+wiki"], "--test_set 'brown+wiki': use letters"),
        ([], "no config.json"),
    ]:
        with pytest.raises(SystemExit):
            evaluate_command.main([str(tmp_path / "final"), "--data", str(BROWN_VALID), *args, "--no_mlflow"])
        assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("files", "name"),
    [
        (["../shared/data/brown/test.txt"], "brown"),
        (["../shared/data/wikitext2/test.txt"], "wikitext2"),
        (["data/brown/valid.txt"], "brown"),
        (["notes/held_out.txt"], "held_out"),
        (["../shared/data/brown/test.txt", "extra.md"], "brown_extra"),  # files scored as one test set
    ],
)
def test_a_test_set_is_named_after_its_corpus_or_its_file(files, name):
    assert default_test_set(files) == name


def test_a_bare_split_file_is_named_after_the_directory_it_is_in(tmp_path, monkeypatch):
    (tmp_path / "wiki").mkdir()
    monkeypatch.chdir(tmp_path / "wiki")
    assert default_test_set(["test.txt"]) == "wiki"


def test_kappa_one_is_the_full_model_scored_once_and_each_draw_is_built_once_for_every_test_set(
    monkeypatch, caplog, capsys
):
    model = tiny_llama()
    random = pruner(model, "random", shared=[], batches=[])
    builds: list[tuple[float, int]] = []
    subnet = random.subnet
    monkeypatch.setattr(random, "subnet", lambda kappa, seed=0: builds.append((kappa, seed)) or subnet(kappa, seed))
    full_width: list[bool] = []  # per forward pass: the central model's (a subnet is a deep copy: the hook too)
    model.register_forward_pre_hook(lambda module, args: full_width.append(module is model))
    g = torch.Generator().manual_seed(0)
    streams = {
        "a": torch.randint(0, VOCAB, (5 * 16,), generator=g),
        "b": torch.randint(0, VOCAB, (3 * 16,), generator=g),
    }

    caplog.set_level("INFO", logger="twist_scale.evaluate")
    a, b = sweep(random, streams, [1.0, 0.5], draws=3, window=16, batch_size=2)
    assert full_width.count(True) == 3 + 2  # a's 5 windows in batches of 2, b's 3: once, not once per draw
    assert full_width.count(False) == 3 * (3 + 2)  # the draws at κ = 0.5 only
    assert sorted(builds) == [(0.5, 0), (0.5, 1), (0.5, 2)]  # no κ = 1 subnet; each draw built once for a and b
    assert "scoring 4 models x 8 windows" in caplog.text
    assert "kappa 0.50 draw 3/3" in capsys.readouterr().err  # the progress bar, on stderr

    for result, stream in ((a, streams["a"]), (b, streams["b"])):
        one, half = result.results
        assert one.ppls == [result.full.ppl] and one.parameters == result.full_parameters
        assert half.ppls == [
            pytest.approx(perplexity(subnet(0.5, seed)[0], stream, window=16).ppl, rel=1e-6) for seed in range(3)
        ]
    assert (a.test_set, b.test_set) == ("a", "b") and a.full.ppl != b.full.ppl
