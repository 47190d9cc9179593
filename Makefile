# Two commands (see README): `make train` and `make test`. Both set up .venv first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
NPROC ?= 2
# DeepSpeed's accelerator: CUDA where a GPU driver is installed, the CPU elsewhere.
export DS_ACCELERATOR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)

.PHONY: setup train dense test test-fast lint gpu-smoke

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# DeepSpeed's CPU accelerator JIT-compiles its shared-memory collective op at the first launch
	# (~1 min on 2 cores, then cached in ~/.cache/torch_extensions): build it here, not inside a run.
	$(BIN)/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $@

setup: $(VENV)/.installed

train: setup
	$(BIN)/deepspeed --num_gpus $(NPROC) launch/train.py --config configs/twist_brown.toml

dense: setup
	$(BIN)/deepspeed --num_gpus $(NPROC) launch/train.py --config configs/dense_brown.toml

test: setup
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q --durations=15 tests

# One GPU, every collective through NCCL in bf16 (world 1, G = 1, kappa 0.5), under both engines.
SMOKE := --config configs/tiny_test.toml --parallel.backend nccl --parallel.precision bf16 \
	--twist.kappa 0.5 --twist.allow_uncovered true --twist.correction mean --twist.optimizer_state aggregate \
	--twist.rounds 2 --twist.local_steps 3 --checkpoint.resume false
gpu-smoke: setup
	DS_ACCELERATOR=cuda $(BIN)/deepspeed --num_gpus 1 launch/train.py $(SMOKE) --out_dir runs/gpu-smoke/deepspeed
	DS_ACCELERATOR=cuda $(BIN)/torchrun --nproc_per_node 1 launch/train.py $(SMOKE) --parallel.engine fsdp \
		--out_dir runs/gpu-smoke/fsdp
	DS_ACCELERATOR=cuda $(BIN)/deepspeed --num_gpus 1 launch/train.py $(SMOKE) --parallel.ds_config ds_configs/zero3.json \
		--out_dir runs/gpu-smoke/zero3
	@echo "GPU SMOKE OK"

# tests/unit and the quick tests/dist checks, no launcher runs (about 1 minute): while editing.
# `make test` runs all three tiers: tests/unit, tests/dist, tests/e2e (launchers, all marked slow).
test-fast: setup
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q -m "not slow" tests

lint: setup
	$(BIN)/ruff check twist_scale launch tests bench
