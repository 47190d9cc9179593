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
from twist_scale.metric_names import MetricName
from twist_scale.sparsity_chart import figure
from twist_scale.tracking import default_uri, experiment_id


def training_run(client: MlflowClient, exp_id: str, name: str, kappa: float, groups: int) -> str:
    """A run with the params the trainer logs (config.flat_params)."""
    run_id = client.create_run(exp_id, run_name=name).info.run_id
    for key, value in {"twist.kappa": kappa, "twist.groups": groups, "twist.correction": "scale"}.items():
        client.log_param(run_id, key, str(value))
    client.set_terminated(run_id)
    return run_id


def sweep(test_set: str, label: str, full: float, ppls: dict[float, list[float]]) -> Sweep:
    results = [KappaResult(k, v, parameters=100, plain=True) for k, v in ppls.items()]
    return Sweep(test_set, label, Perplexity(full, 0.0, 10, 1), 200, results, settings={"protocol": "test protocol"})


def has_color(pixels: np.ndarray, hex_color: str) -> bool:
    rgb = np.array([int(hex_color[i : i + 2], 16) for i in (1, 3, 5)]) / 255
    return bool((np.abs(pixels[..., :3] - rgb).max(-1) < 0.02).any())


@pytest.mark.slow  # 3 s: matplotlib's first chart
def test_compare_prints_table_and_logs_png(tmp_path, capsys):
    uri = default_uri(tmp_path)
    client = MlflowClient(uri)
    exp_id = experiment_id(client, "exp")
    twist = training_run(client, exp_id, "twist-run", 0.5, 2)
    dense = training_run(client, exp_id, "dense-run", 1.0, 1)
    log_sweep(sweep("brown", "random", 30.0, {1.0: [30.0], 0.5: [34.0, 36.0]}), uri, twist)
    log_sweep(sweep("brown", "magnitude", 25.0, {1.0: [25.0], 0.5: [80.0]}), uri, dense)

    out = tmp_path / "cmp"
    compare_command.main(["--tracking.uri", uri, "--tracking.experiment", "exp", "--out", str(out)])
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| run | training | test set | method | full | κ=1.00 (0% sparse) | κ=0.50 (50% sparse)")
    assert rows[1:] == [
        "| twist-run | twist κ=0.5 G=2 scale | brown | random | 30.00 | 30.00 | 35.00 ± 1.41 |",
        "| dense-run | dense | brown | magnitude | 25.00 | 25.00 | 80.00 |",
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


def test_a_second_test_set_adds_keys_and_a_rerun_says_it_replaces(tmp_path, caplog):
    uri = default_uri(tmp_path)
    client = MlflowClient(uri)
    run = training_run(client, experiment_id(client, "exp"), "twist-run", 0.5, 2)
    log_sweep(sweep("brown", "random", 30.0, {1.0: [30.0], 0.5: [34.0, 36.0]}), uri, run)
    log_sweep(sweep("wikitext2", "random", 50.0, {1.0: [50.0], 0.5: [60.0, 62.0]}), uri, run)
    metrics = client.get_run(run).data.metrics
    assert (metrics["test/brown/random/ppl_full"], metrics["test/wikitext2/random/ppl_full"]) == (30.0, 50.0)
    assert (metrics["test/brown/random/ppl_kappa_0.50"], metrics["test/wikitext2/random/ppl_kappa_0.50"]) == (
        35.0,
        61.0,
    )
    assert "replaces" not in caplog.text  # neither replaced the other

    log_sweep(sweep("brown", "random", 31.0, {1.0: [31.0], 0.5: [33.0, 35.0]}), uri, run)
    warnings = [r.getMessage() for r in caplog.records if "replaces" in r.getMessage()]
    assert len(warnings) == 1 and "test/brown/random/" in warnings[0]
    metrics = client.get_run(run).data.metrics
    assert (metrics["test/brown/random/ppl_full"], metrics["test/wikitext2/random/ppl_full"]) == (31.0, 50.0)


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("test/brown/flap/ppl_full", MetricName("brown", "flap")),
        ("test/wikitext-2/random-nocorr/ppl_kappa_0.50", MetricName("wikitext-2", "random-nocorr", 0.5)),
        ("test/brown/flap_uniform/ppl_kappa_0.25_std", MetricName("brown", "flap_uniform", 0.25, "std")),
        ("test/random/ppl_full", None),  # the names before test sets had their own part
        ("eval/ppl_kappa_0.50", None),
    ],
)
def test_metric_names_round_trip(key, name):
    assert MetricName.parse(key) == name
    if name is not None:
        assert str(name) == key


def chart_series(run: str, training: str, method: str, test: str, full: float, ppl: dict[float, float]) -> Series:
    return Series(run, run, training, test, method, full, ppl)


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
    assert all(ax.get_legend().get_title().get_text() == "dashed: post-hoc baselines   solid: TwIST" for ax in fig.axes)
    plt.close(fig)


def test_chart_names_its_test_set_and_only_the_kinds_of_line_it_draws():
    series = [chart_series("tw", "twist κ=0.5 G=2 scale", "random", "brown", 420.0, {0.5: 800.0, 0.25: 1200.0})]
    fig = figure(series, "exp")
    (ax,) = fig.axes
    assert ax.get_title() == "test set: brown"
    legend = ax.get_legend()
    assert legend.get_title().get_text() == "solid: TwIST"
    assert not [t for t in legend.get_texts() if "baseline" in t.get_text()]
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
