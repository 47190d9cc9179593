#!/usr/bin/env bash
# The first hour after `make setup`, as the README shows it: train TwIST on Brown, export every κ,
# evaluate on the test split, compare in MLflow, then the dense baseline and FLAP on it. Run from the
# repository root; tests/e2e/test_quickstart.py runs it, as written, on a tiny model.
set -euo pipefail
.venv/bin/deepspeed --num_gpus 2 launch/train.py --config configs/twist_brown.toml  # what make train runs
.venv/bin/python launch/export.py runs/twist_brown/final --kappa 0.75 0.5 0.25 --out runs/twist_brown/exports
.venv/bin/python launch/evaluate.py runs/twist_brown/final --data ../shared/data/brown/test.txt --draws 5
.venv/bin/python launch/compare.py --tracking.uri sqlite:///$PWD/runs/twist_brown/mlflow.db  # table + PNG
.venv/bin/deepspeed --num_gpus 2 launch/train.py --config configs/dense_brown.toml  # what make dense runs
.venv/bin/python launch/evaluate.py runs/dense_brown/final --data ../shared/data/brown/test.txt --method flap
