# Prefloop: the two commands a new user needs are `make demo` and `make test`.
# Every target installs what it needs first (a .venv at the repo root).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Set TORCH_INDEX_URL to a CUDA wheel index on a GPU host (see README, "GPU hosts").
TORCH_INDEX_URL ?=
TORCH_SPEC := torch==2.13.0
# The demo annotators' taste, e.g. TASTE=fidelity:1,warmth:1 (empty: worker.shapes.tastes.DEMO_MIX).
TASTE ?=

export HF_HUB_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test test-fast lint format bench bench-quick migrate serve clean services system-deps

setup: $(STAMP) ## create .venv and install everything (idempotent)

$(STAMP): pyproject.toml constraints.txt
	@test -n "$(PYTHON)" || { echo "Python 3.11 not found: install python3.11 and retry"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	@touch $@
	@echo "setup: .venv ready"

system-deps: ## Debian packages the tests use: headless Chromium and docker-compose (validation only)
	@bash scripts/system_deps.sh

services: ## start PostgreSQL and Redis if they are down (this project's machines)
	@bash scripts/services.sh

demo: setup ## run the whole loop locally: SQLite, embedded broker, built-in model
	$(BIN)/python -m clients.demo $(if $(TASTE),--taste "$(TASTE)")

serve: setup
	$(BIN)/prefloop serve

migrate: setup ## alembic upgrade head on PREFLOOP_DATABASE_URL (default: SQLite under ./var)
	$(BIN)/prefloop migrate

test: setup system-deps services ## the full suite: PostgreSQL, Redis, SQLite, real Celery workers, headless Chromium
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not browser"

lint: setup
	$(BIN)/ruff check backend worker ui bench tests prefloop_client clients
	$(BIN)/ruff format --check backend worker ui bench tests prefloop_client clients
	$(BIN)/mypy

format: setup
	$(BIN)/ruff format backend worker ui bench tests prefloop_client clients
	$(BIN)/ruff check --fix backend worker ui bench tests prefloop_client clients

bench: setup services ## every benchmark, full size
	$(BIN)/python -m bench.train_step
	$(BIN)/python -m bench.alignment
	$(BIN)/python -m bench.taste_rounds
	$(BIN)/python -m bench.ab_test
	$(BIN)/python -m bench.data_quality
	$(BIN)/python -m bench.loop
	$(BIN)/python -m bench.api_load
	$(BIN)/python -m bench.api_fuzz
	$(BIN)/python -m bench.worker_kill
	$(BIN)/python -m bench.ui_latency
	$(BIN)/python -m bench.storage

bench-quick: setup services ## every benchmark with --quick (each under 2 minutes)
	$(BIN)/python -m bench.train_step --quick
	$(BIN)/python -m bench.alignment --quick
	$(BIN)/python -m bench.taste_rounds --quick
	$(BIN)/python -m bench.ab_test --quick
	$(BIN)/python -m bench.data_quality --quick
	$(BIN)/python -m bench.loop --quick
	$(BIN)/python -m bench.api_load --quick
	$(BIN)/python -m bench.api_fuzz --quick
	$(BIN)/python -m bench.worker_kill --quick
	$(BIN)/python -m bench.ui_latency --quick
	$(BIN)/python -m bench.storage --quick

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache .mypy_cache
