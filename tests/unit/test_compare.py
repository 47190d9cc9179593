"""The comparison command on a real sqlite MLflow store: a TwIST run and a dense baseline run."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib import image
from mlflow.tracking import MlflowClient

from twist_scale import compare
from twist_scale.evaluate import KappaResult, Perplexity, Sweep, log_sweep
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
    compare.main(["--tracking.uri", uri, "--tracking.experiment", "exp", "--out", str(out)])
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
    assert has_color(pixels, "#1f77b4") and has_color(pixels, "#aec7e8")  # both series drawn (tab20)
    assert (out / "ppl_vs_sparsity.md").read_text().strip() == "\n".join(printed.splitlines()[: len(rows) + 1])

    comparison = client.search_runs([exp_id], "tags.`twist.kind` = 'comparison'")
    assert len(comparison) == 1
    logged = {a.path for a in client.list_artifacts(comparison[0].info.run_id)}
    assert logged == {"ppl_vs_sparsity.png", "ppl_vs_sparsity.md"}

    compare.main(
        ["--tracking.uri", uri, "--tracking.experiment", "exp", "--out", str(out)]
    )  # reuses the comparison run
    assert len(client.search_runs([exp_id], "tags.`twist.kind` = 'comparison'")) == 1
    assert capsys.readouterr().out.count("| twist-run |") == 1

    with pytest.raises(SystemExit) as exit_:
        compare.main(["--tracking.uri", uri, "--tracking.experiment", "nope", "--out", str(out)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "no experiment 'nope'" in err and "one of: exp, Default" in err
