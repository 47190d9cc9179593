"""The README's commands, run as written: docs/quickstart.sh (which the README quotes line for line) in a
checkout whose two run configs are swapped for tiny ones, beside a `../shared/data` whose files are the
first few kilobytes of the real ones. Its `.venv/bin/deepspeed` adds a free `--master_port`, as every
launch in the tests does."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from helpers import DATA, REPO, free_port

SCRIPT = REPO / "docs" / "quickstart.sh"


def tiny(out_dir: str, groups: int, kappa: float) -> str:
    """configs/tiny_test.toml as the run `out_dir` names, at G groups and κ."""
    text = (REPO / "configs" / "tiny_test.toml").read_text()
    text = text.replace('out_dir = "runs/tiny"', f'out_dir = "{out_dir}"')
    return text.replace("[twist]\n", f"[twist]\ngroups = {groups}\nkappa = {kappa}\n")


def venv_with_free_port(venv: Path) -> None:
    """The repository's venv, seen through links, except that `deepspeed` picks a free rendezvous port."""
    (venv / "bin").mkdir(parents=True)
    for entry in (REPO / ".venv").iterdir():
        if entry.name != "bin":
            (venv / entry.name).symlink_to(entry)
    for tool in (REPO / ".venv" / "bin").iterdir():
        (venv / "bin" / tool.name).symlink_to(tool)
    launcher = venv / "bin" / "deepspeed"
    launcher.unlink()
    launcher.write_text(f'#!/bin/sh\nexec {REPO / ".venv" / "bin" / "deepspeed"} --master_port {free_port()} "$@"\n')
    launcher.chmod(0o755)


def test_the_readme_commands_run_as_written(tmp_path):
    commands = [line for line in SCRIPT.read_text().splitlines() if line.startswith(".venv/")]
    readme = (REPO / "README.md").read_text()
    assert len(commands) == 6 and all(c in readme for c in commands)

    checkout = tmp_path / "main"
    (checkout / "configs").mkdir(parents=True)
    for corpus, size in (
        ("tinyshakespeare/input.txt", 200_000),
        ("brown/valid.txt", 20_000),
        ("brown/test.txt", 20_000),
    ):
        (tmp_path / "shared" / "data" / corpus).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "shared" / "data" / corpus).write_text((DATA / corpus).read_text()[:size])
    for name in ("launch", "ds_configs", "docs"):
        (checkout / name).symlink_to(REPO / name)
    venv_with_free_port(checkout / ".venv")
    (checkout / "configs" / "twist_brown.toml").write_text(tiny("runs/twist_brown", groups=2, kappa=0.5))
    (checkout / "configs" / "dense_brown.toml").write_text(tiny("runs/dense_brown", groups=1, kappa=1.0))
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    proc = subprocess.run(
        ["bash", "docs/quickstart.sh"], cwd=checkout, env=env, capture_output=True, text=True, timeout=540
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    runs = checkout / "runs"
    assert {p.name for p in (runs / "twist_brown" / "exports").iterdir()} >= {"random_kappa_0.50_seed0"}
    assert (runs / "compare" / "ppl_vs_sparsity.png").is_file()
    assert (runs / "dense_brown" / "final" / "model.safetensors").is_file()
