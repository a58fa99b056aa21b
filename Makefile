# phasetune: `make demo` runs the main job, `make test` the whole test suite.
# Both create .venv and install what they need. Override the torch pin for GPUs, e.g.
#   make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
PYTEST_ARGS ?=

.PHONY: test demo lint bench venv torch dev examples clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: an unpinned torch pulls gigabytes of CUDA packages.
torch: $(BIN)/python
	@if [ "$$(cat $(VENV)/.torch-spec 2>/dev/null)" != "$(TORCH)" ]; then \
		echo "installing $(TORCH)"; \
		$(PIP) install $(TORCH) && echo "$(TORCH)" > $(VENV)/.torch-spec; \
	fi

$(VENV)/.dev-stamp: pyproject.toml | torch
	$(PIP) install -e ".[dev]"
	touch $@

dev: torch $(VENV)/.dev-stamp

test: dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: dev
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
