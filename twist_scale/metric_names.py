"""The test-perplexity metric names evaluation logs and comparison reads, built and parsed in one place.

`test/<test set>/<label>/ppl_full` is the full model; `test/<test set>/<label>/ppl_kappa_0.50` the mean
over draws at κ, with `_std`, `_min`, `_max` when there are several draws. The test set (brown,
wikitext2) and the label (the method, or a variant such as random-nocorr) are separate parts of the
name, so a second test set or a second variant adds keys instead of replacing the first one's. Each
κ's draws are also in a nested run named `<test set>/<label> kappa=0.50`, whose params name the method.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

NAME = re.compile(r"[\w.:-]+")  # what MLflow accepts inside a metric name, '/' aside (it separates the parts)
STATS = ("std", "min", "max")
SPLIT_FILES = ("test.txt", "valid.txt")  # a corpus's splits: the directory names the test set
JOIN = "_"  # between the names of files scored as one test set ('+' is not allowed in an MLflow name)
_NAME = re.compile(
    rf"test/(?P<test_set>{NAME.pattern})/(?P<label>{NAME.pattern})/"
    rf"ppl_(?:(?P<full>full)|kappa_(?P<kappa>\d+\.\d+)(?:_(?P<stat>{'|'.join(STATS)}))?)"
)


@dataclass(frozen=True)
class MetricName:
    test_set: str
    label: str
    kappa: float | None = None  # None: the full model
    stat: str = ""  # '' the mean over draws, else one of STATS

    def __str__(self) -> str:
        prefix = metric_prefix(self.test_set, self.label)
        if self.kappa is None:
            return f"{prefix}ppl_full"
        return f"{prefix}ppl_kappa_{self.kappa:.2f}" + (f"_{self.stat}" if self.stat else "")

    @classmethod
    def parse(cls, key: str) -> MetricName | None:
        """The name `key` spells, or None for any other metric."""
        m = _NAME.fullmatch(key)
        if m is None:
            return None
        if m["full"]:
            return cls(m["test_set"], m["label"])
        return cls(m["test_set"], m["label"], float(m["kappa"]), m["stat"] or "")


def metric_prefix(test_set: str, label: str) -> str:
    """What every metric of one label on one test set starts with: a rerun of both finds its earlier values."""
    return f"test/{test_set}/{label}/"


def eval_run_name(test_set: str, label: str, kappa: float) -> str:
    """The name of the nested run that holds a label's draws at κ on a test set."""
    return f"{test_set}/{label} kappa={kappa:.2f}"


def default_test_set(files: list[str]) -> str:
    """The name a test set's metrics carry when none is given: its corpus for a split file
    (../shared/data/brown/test.txt → brown), else the file's stem; files scored together are joined."""
    paths = [Path(os.path.abspath(f)) for f in files]  # a bare 'test.txt' still has a directory
    return JOIN.join(p.parent.name if p.name in SPLIT_FILES else p.stem for p in paths)


def check_name(flag: str, name: str) -> None:
    """One line naming the flag to fix, rather than MLflow's error when the metric is logged."""
    if not NAME.fullmatch(name):
        raise ValueError(f"{flag} {name!r}: use letters, digits, '_', '-', '.' or ':' (it becomes a metric name)")
