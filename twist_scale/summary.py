"""The block a run ends with: what it reached, where the model is, and the commands to run next."""

from __future__ import annotations

import sys
from pathlib import Path

from twist_scale.config import RunConfig
from twist_scale.tracking import default_uri


def run_summary(cfg: RunConfig, final: Path, metrics: dict[str, float], full_parameters: int) -> str:
    """Validation perplexity of every trained size (a TwIST run measures its subnets; the full width is
    measured by the evaluate command below), the central model's place and this run's next commands."""
    lines = [f"training finished: {cfg.twist.rounds} rounds, {cfg.total_steps} steps"]
    for key, ppl in metrics.items():
        if key.startswith("eval/ppl_kappa_"):
            kappa = key.removeprefix("eval/ppl_kappa_")
            size = "full width" if float(kappa) == 1.0 else "subnet"
            lines.append(f"  validation perplexity at kappa {kappa} ({size}): {ppl:.2f}")
    lines.append(f"  central model, full width, {full_parameters / 1e6:.2f}M params: {final}")
    scripts = Path(sys.executable).parent  # this environment's console scripts: the commands run as printed
    lines += [
        "next:",
        f"  {scripts / 'twist-export'} {final} --kappa 0.75 0.5 0.25 --out {Path(cfg.out_dir) / 'exports'}",
        f"  {scripts / 'twist-evaluate'} {final} --data TEST.txt --kappa 1.0 0.75 0.5 0.25",
    ]
    if cfg.tracking.enabled:
        uri = cfg.tracking.uri or default_uri(Path(cfg.out_dir))
        lines.append(
            f"  {scripts / 'twist-compare'} --tracking.uri {uri} --tracking.experiment {cfg.tracking.experiment}"
        )
    return "\n".join(lines)
