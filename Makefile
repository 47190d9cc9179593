# Two commands (see README): `make train` and `make test`. Both set up .venv first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
NPROC ?= 2
export DS_ACCELERATOR ?= cpu

.PHONY: setup train dense test lint

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
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/ruff check twist_scale launch tests bench
