"""The perplexity-vs-sparsity chart `twist-compare` draws: one panel per test set.

x: sparsity 1 − κ (the full model at 0); y: perplexity on a log axis with labelled ticks. Post-hoc
baselines (models trained dense, or external ones) are dashed in muted colours, TwIST exports solid,
one colour per TwIST run; the marker says the method. In each panel the best baseline and the best
TwIST export are drawn thick and named first in the legend; the others recede.
Its input, a Series per run × test set × label, is defined here rather than in compare.py, which collects
the series from MLflow: the chart then imports nothing from the module that imports it.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axis import Axis
    from matplotlib.figure import Figure

BEST_KAPPA = 0.5
MARKERS = "os^DvP*X<>ph"
# Tick sets tried on the log axis, coarsest first (multiples of each power of ten); the first that puts
# MIN_TICKS ticks in the panel's range is used, else evenly spaced ones.
SUBS = (
    (1.0,),
    (1.0, 2.0, 5.0),
    (1.0, 2.0, 3.0, 5.0),
    (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0),
    (1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0, 8.0, 9.0),
)
MIN_TICKS = 4
THICK, THIN = 3.2, 1.2
LINE_KINDS = ((True, "dashed: post-hoc baselines"), (False, "solid: TwIST"))  # the legend names those drawn
PANEL_INCHES = 4.8  # a panel's height, taller when its legend needs it:
LEGEND_ROW_INCHES = 0.2  # one legend entry at fontsize 8, spacing included


@dataclass
class Series:
    """One label's perplexity over κ on one test set of one run."""

    run_id: str
    run_name: str
    training: str  # 'twist κ=0.5 G=2 scale', 'dense' or 'external'
    test_set: str
    label: str  # the method, or a variant of it (random-nocorr)
    full: float | None
    ppl: dict[float, float] = field(default_factory=dict)
    std: dict[float, float] = field(default_factory=dict)

    @property
    def baseline(self) -> bool:
        """Pruned post hoc: a model trained dense, or one trained elsewhere."""
        return not self.training.startswith("twist")

    @property
    def legend(self) -> str:
        training = "" if self.training == "dense" else f" [{self.training.removeprefix('twist ')}]"
        return f"{self.run_name}{training} · {self.label}"


def best(series: list[Series]) -> Series | None:
    """Lowest perplexity at κ = 0.5 when all of them have it, else lowest mean over the κ they all share."""
    if not series:
        return None
    shared = set.intersection(*(set(s.ppl) for s in series))
    kappas = [BEST_KAPPA] if BEST_KAPPA in shared else sorted(shared)
    return min(series, key=lambda s: statistics.fmean(s.ppl[k] for k in kappas) if kappas else math.inf)


def label_log_axis(axis: Axis, low: float, high: float) -> None:
    """Major ticks with plain numbers (400, 600, 1000, 2000) over [low, high] of a log axis; minor ones unlabelled."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    locator = MaxNLocator(6)
    for subs in SUBS:
        candidate = LogLocator(10, subs=subs, numticks=1000)
        if sum(low <= t <= high for t in candidate.tick_values(low, high)) >= MIN_TICKS:
            locator = candidate
            break
    axis.set_major_locator(locator)
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f}" if v >= 100 else f"{v:.3g}"))
    axis.set_minor_formatter(NullFormatter())


def figure(series: list[Series], title: str) -> Figure:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({s.test_set for s in series})
    height = max(PANEL_INCHES, 1.0 + LEGEND_ROW_INCHES * max(sum(s.test_set == p for s in series) for p in panels))
    fig, axes = plt.subplots(len(panels), 1, figsize=(13, height * len(panels)), squeeze=False, layout="constrained")
    pairs = plt.get_cmap("tab20").colors  # (dark, light) shades of tab10's ten hues
    baselines = list(dict.fromkeys((s.run_name, s.label) for s in series if s.baseline))
    runs = list(dict.fromkeys(s.run_name for s in series if not s.baseline))
    markers = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(dict.fromkeys(s.label for s in series))}

    def style(s: Series, stressed: bool) -> dict:
        """TwIST solid, a strong colour per run from the first hues; baselines dashed, light shades of the last
        hues (the best one dark), so the two families share no colour while there are five of each at most."""
        if s.baseline:
            hue = 9 - baselines.index((s.run_name, s.label)) % 10
            return {"color": pairs[2 * hue + (0 if stressed else 1)], "linestyle": "--"}
        return {"color": pairs[2 * (runs.index(s.run_name) % 10)], "linestyle": "-"}

    for ax, test_set in zip(axes[:, 0], panels, strict=True):
        shown = [s for s in series if s.test_set == test_set]
        stressed: dict[int, str] = {}  # id of the series -> its legend prefix
        for kind, baseline in (("baseline", True), ("TwIST", False)):
            if (b := best([s for s in shown if s.baseline == baseline])) is not None:
                stressed[id(b)] = f"best {kind}"
        ends: list[float] = []
        for s in sorted(shown, key=lambda s: (id(s) not in stressed, not s.baseline)):  # legend order
            points = ({1.0: s.full} if s.full is not None else {}) | s.ppl
            kappas = sorted(points, reverse=True)
            x, y, err = [1 - k for k in kappas], [points[k] for k in kappas], [s.std.get(k, 0.0) for k in kappas]
            ends += [v - e if v > e else v for v, e in zip(y, err, strict=True)]  # the axis range, error bars in
            ends += [v + e for v, e in zip(y, err, strict=True)]
            tag = stressed.get(id(s))
            line = {**style(s, tag is not None), "alpha": 1.0 if tag or s.baseline else 0.7, "zorder": 3 if tag else 2}
            ax.plot(
                x,
                y,
                label=f"{tag}: {s.legend}" if tag else s.legend,
                marker=markers[s.label],
                linewidth=THICK if tag else THIN,
                markersize=8 if tag else 5,
                **line,
            )
            if s.std:
                ax.errorbar(x, y, yerr=err, fmt="none", ecolor=line["color"], capsize=3, alpha=line["alpha"])
        ax.set_yscale("log")
        ax.set_ylim(min(ends) / 1.06, max(ends) * 1.06)
        label_log_axis(ax.yaxis, min(ends) / 1.06, max(ends) * 1.06)
        sparsities = sorted({1 - k for s in shown for k in ({1.0} if s.full is not None else set()) | set(s.ppl)})
        ax.set_xticks(sparsities, [f"{x:.0%}\n" + (f"κ={1 - x:.2f}" if x else "full") for x in sparsities])
        ax.set_xlim(sparsities[0] - 0.03, sparsities[-1] + 0.03)
        ax.set_xlabel("sparsity (1 − κ)")
        ax.set_ylabel("perplexity (log scale)")
        ax.set_title(f"test set: {test_set}")
        ax.grid(True, which="major", alpha=0.35)
        drawn = [text for baseline, text in LINE_KINDS if any(s.baseline == baseline for s in shown)]
        ax.legend(
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            fontsize=8,
            title="   ".join(drawn),
            title_fontsize=8,
            handlelength=4,
        )
    fig.suptitle(title)
    return fig


def plot(series: list[Series], path: Path, title: str) -> Path:
    fig = figure(series, title)
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
