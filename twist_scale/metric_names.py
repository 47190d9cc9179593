"""The test-perplexity metric names evaluation logs and comparison reads, built and parsed in one place.

`test/<label>/ppl_full` is the full model; `test/<label>/ppl_kappa_0.50` the mean over draws at κ,
with `_std`, `_min`, `_max` when there are several draws. The label is per method (or variant) and
test set, since one run is often evaluated on several: `<method>[variant]_<test set>` (flap_brown,
random-nocorr_wikitext2), or the method alone for a single test set. Each κ's draws are also in a
nested run named `<label> kappa=0.50`, whose params name the method.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LABEL = re.compile(r"[\w.:-]+")
STATS = ("std", "min", "max")
_NAME = re.compile(
    rf"test/(?P<label>{LABEL.pattern})/ppl_(?:(?P<full>full)|kappa_(?P<kappa>\d+\.\d+)(?:_(?P<stat>{'|'.join(STATS)}))?)"
)


@dataclass(frozen=True)
class MetricName:
    label: str
    kappa: float | None = None  # None: the full model
    stat: str = ""  # '' the mean over draws, else one of STATS

    def __str__(self) -> str:
        if self.kappa is None:
            return f"test/{self.label}/ppl_full"
        return f"test/{self.label}/ppl_kappa_{self.kappa:.2f}" + (f"_{self.stat}" if self.stat else "")

    @classmethod
    def parse(cls, key: str) -> MetricName | None:
        """The name `key` spells, or None for any other metric."""
        m = _NAME.fullmatch(key)
        if m is None:
            return None
        if m["full"]:
            return cls(m["label"])
        return cls(m["label"], float(m["kappa"]), m["stat"] or "")


def eval_run_name(label: str, kappa: float) -> str:
    """The name of the nested run that holds a label's draws at κ."""
    return f"{label} kappa={kappa:.2f}"


def label_of_eval_run(name: str) -> str:
    return name.rpartition(" kappa=")[0]


def split_label(label: str, method: str) -> tuple[str, str]:
    """(what was measured, the test set) of a label the method's evaluation logged; '' when it names none.

    flap_brown → (flap, brown); flap_uniform → (flap_uniform, ''); random-nocorr_brown → (random-nocorr,
    brown); a label that does not start with the method names the test set: brown → (method, brown).
    """
    if not method:
        return label, ""
    if not label.startswith(method):
        return method, label
    if "_" not in label[len(method) :]:
        return label, ""
    measured, _, test_set = label.rpartition("_")
    return measured, test_set
