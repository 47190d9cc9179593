"""The comparison command on a real sqlite MLflow store: a TwIST run and a dense baseline run."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib import image
from matplotlib import pyplot as plt
from mlflow.tracking import MlflowClient

from twist_scale.commands import compare as compare_command
from twist_scale.compare import Series
from twist_scale.evaluate import KappaResult, Perplexity, Sweep, log_sweep
from twist_scale.metric_names import split_label
from twist_scale.sparsity_chart import figure
from twist_scale.tracking import default_uri, experiment_id


def training_run(client: MlflowClient, exp_id: str, name: str, kappa: float, groups: int) -> str:
    """A run with the params the trainer logs (config.flat_params)."""
    run_id = client.create_run(exp_id, run_name=name).info.run_id
    for key, value in {"twist.kappa": kappa, "twist.groups": groups, "twist.correction": "scale"}.items():
        client.log_param(run_id, key, str(value))
    client.set_terminated(run_id)
    return run_id


def sweep(label: str, full: float, ppls: dict[float, list[float]]) -> Sweep:
    results = [KappaResult(k, v, parameters=100, plain=True) for k, v in ppls.items()]
    return Sweep(label, Perplexity(full, 0.0, 10, 1), 200, results, settings={"protocol": "test protocol"})


def has_color(pixels: np.ndarray, hex_color: str) -> bool:
    rgb = np.array([int(hex_color[i : i + 2], 16) for i in (1, 3, 5)]) / 255
    return bool((np.abs(pixels[..., :3] - rgb).max(-1) < 0.02).any())


def test_compare_prints_table_and_logs_png(tmp_path, capsys):
    uri = default_uri(tmp_path)
    client = MlflowClient(uri)
    exp_id = experiment_id(client, "exp")
    twist = training_run(client, exp_id, "twist-run", 0.5, 2)
    dense = training_run(client, exp_id, "dense-run", 1.0, 1)
    log_sweep(sweep("random", 30.0, {1.0: [30.0], 0.5: [34.0, 36.0]}), uri, twist)
    log_sweep(sweep("magnitude", 25.0, {1.0: [25.0], 0.5: [80.0]}), uri, dense)

    out = tmp_path / "cmp"
    compare_command.main(["--tracking.uri", uri, "--tracking.experiment", "exp", "--out", str(out)])
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| run | training | method | full | κ=1.00 (0% sparse) | κ=0.50 (50% sparse)")
    assert rows[1:] == [
        "| twist-run | twist κ=0.5 G=2 scale | random | 30.00 | 30.00 | 35.00 ± 1.41 |",
        "| dense-run | dense | magnitude | 25.00 | 25.00 | 80.00 |",
    ]  # nested per-κ runs are not rows

    png = out / "ppl_vs_sparsity.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(png)
    assert has_color(pixels, "#1f77b4") and has_color(pixels, "#17becf")  # both drawn: TwIST run, best baseline
    assert (out / "ppl_vs_sparsity.md").read_text().strip() == "\n".join(printed.splitlines()[: len(rows) + 1])

    comparison = client.search_runs([exp_id], "tags.`twist.kind` = 'comparison'")
    assert len(comparison) == 1
    logged = {a.path for a in client.list_artifacts(comparison[0].info.run_id)}
    assert logged == {"ppl_vs_sparsity.png", "ppl_vs_sparsity.md"}

    compare_command.main(
        ["--tracking.uri", uri, "--tracking.experiment", "exp", "--out", str(out)]
    )  # reuses the comparison run
    assert len(client.search_runs([exp_id], "tags.`twist.kind` = 'comparison'")) == 1
    assert capsys.readouterr().out.count("| twist-run |") == 1

    with pytest.raises(SystemExit) as exit_:
        compare_command.main(["--tracking.uri", uri, "--tracking.experiment", "nope", "--out", str(out)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "no experiment 'nope'" in err and "one of: exp, Default" in err


@pytest.mark.parametrize(
    ("label", "method", "split"),
    [
        ("flap_brown", "flap", ("flap", "brown")),
        ("flap_uniform_wikitext2", "flap_uniform", ("flap_uniform", "wikitext2")),
        ("flap_uniform", "flap_uniform", ("flap_uniform", "")),
        ("random-nocorr_brown", "random", ("random-nocorr", "brown")),
        ("magnitude-none", "magnitude", ("magnitude-none", "")),
        ("brown", "random", ("random", "brown")),
        ("wanda_sp_brown", "", ("wanda_sp_brown", "")),  # method unknown: one unnamed test set
    ],
)
def test_label_names_method_and_test_set(label, method, split):
    assert split_label(label, method) == split


def chart_series(run: str, training: str, method: str, test: str, full: float, ppl: dict[float, float]) -> Series:
    return Series(run, run, training, f"{method}_{test}", full, ppl, method=method)


def test_chart_has_a_panel_per_test_set_with_the_best_stressed_and_every_tick_labelled():
    twist = "twist κ=0.5 G=2 scale"
    series = [
        # brown: at κ=0.5 magnitude beats flap, though flap's mean over κ is lower
        chart_series("dense", "dense", "flap", "brown", 380.0, {0.75: 400.0, 0.5: 900.0, 0.25: 1500.0}),
        chart_series("dense", "dense", "magnitude", "brown", 380.0, {0.75: 600.0, 0.5: 700.0, 0.25: 2500.0}),
        chart_series("tw", twist, "random", "brown", 420.0, {0.75: 450.0, 0.5: 800.0, 0.25: 1200.0}),
        chart_series("tw", twist, "magnitude", "brown", 420.0, {0.75: 440.0, 0.5: 750.0, 0.25: 1900.0}),
        # wikitext2 has no κ=0.5: the mean over the κ they share decides
        chart_series("dense", "dense", "flap", "wikitext2", 1000.0, {0.75: 1100.0, 0.25: 1400.0}),
        chart_series("dense", "dense", "magnitude", "wikitext2", 1000.0, {0.75: 1050.0, 0.25: 1700.0}),
        chart_series("tw", twist, "random", "wikitext2", 1100.0, {0.75: 1150.0, 0.25: 1300.0}),
        chart_series("tw", twist, "magnitude", "wikitext2", 1100.0, {0.75: 1120.0, 0.25: 1500.0}),
    ]
    fig = figure(series, "exp")
    fig.canvas.draw()
    assert [ax.get_title() for ax in fig.axes] == ["test set: brown", "test set: wikitext2"]
    expected = {
        "test set: brown": ("dense · magnitude", "tw [κ=0.5 G=2 scale] · magnitude"),
        "test set: wikitext2": ("dense · flap", "tw [κ=0.5 G=2 scale] · random"),
    }
    for ax in fig.axes:
        lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
        assert len(lines) == 4
        baseline, twist_best = expected[ax.get_title()]
        best = {f"best baseline: {baseline}", f"best TwIST: {twist_best}"}
        assert best <= set(lines)
        assert min(lines[k].get_linewidth() for k in best) > max(
            line.get_linewidth() for k, line in lines.items() if k not in best
        )
        assert lines[f"best baseline: {baseline}"].get_linestyle() == "--"
        assert lines[f"best TwIST: {twist_best}"].get_linestyle() == "-"
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert legend[:2] == [f"best baseline: {baseline}", f"best TwIST: {twist_best}"]  # named first
        low, high = ax.get_ylim()
        ticks = {t.get_text(): t.get_position()[1] for t in ax.get_yticklabels() if low <= t.get_position()[1] <= high}
        assert len(ticks) >= 4 and "" not in ticks, ticks
        assert [text for text, value in ticks.items() if value > 1000], ticks  # labels above 1000 too
    brown = {t.get_text() for t in fig.axes[0].get_yticklabels()}
    assert {"400", "600", "1000", "2000"} <= brown
    plt.close(fig)


def test_chart_panels_grow_so_a_long_legend_stays_inside_its_panel():
    twist = "twist κ=0.5 G=2 scale"
    series = [
        chart_series(f"run{i}", twist if i else "dense", method, test, 500.0 + i, {0.5: 600.0 + i})
        for i in range(10)
        for method in ("random", "magnitude", "adaptive_magnitude")
        for test in ("brown", "wikitext2")
    ]
    fig = figure(series, "exp")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    panels = [ax.get_window_extent(renderer) for ax in fig.axes]
    legends = [ax.get_legend().get_window_extent(renderer) for ax in fig.axes]
    assert legends[0].y0 >= legends[1].y1 - 1  # the top panel's legend does not run into the next one
    assert all(legend.height <= fig.bbox.height / len(panels) for legend in legends)
    plt.close(fig)


def test_training_names_each_groups_kappa():
    from twist_scale.compare import training_of

    assert training_of({"twist.kappa": "1.0", "twist.groups": "1"}) == "dense"
    plain = {"twist.kappa": "0.5", "twist.groups": "2", "twist.correction": "mean", "twist.group_kappas": "[]"}
    assert training_of(plain) == "twist κ=0.5 G=2 mean"
    assert training_of({**plain, "twist.group_kappas": "[1.0, 0.5]"}) == "twist κ=1,0.5 G=2 mean"
