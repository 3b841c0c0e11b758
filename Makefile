# `make demo`: create .venv, build the demo data set and run the main job on it.
# `make test`: create .venv, check formatting and lint (`make lint`), then run the whole test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first and pinned: on the project's machines this is a local CPU build, while a bare
# `torch` requirement pulls a multi-GB CUDA build. Override it for a GPU machine, e.g. TORCH_SPEC="torch==2.13.0".
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo_data
DEMO_EPOCHS ?= 15
DEMO_SEEDS ?= 0 1 2
STAMP := $(VENV)/.installed

.PHONY: demo test lint format install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/compare.py --demo-dir $(DEMO_DIR) --output-dir runs/demo --seeds $(DEMO_SEEDS) --epochs $(DEMO_EPOCHS)

# black, isort, flake8 and pytype, as the Model Zoo's code-format check runs them (pyproject.toml, .flake8; pytype at
# its defaults, on the library that the bundle ships and the entry points); `make format` applies the first two.
# pytype runs on Python <= 3.12 only (its last release); its cache is .pytype/.
lint: $(STAMP)
	$(BIN)/black --check --quiet .
	$(BIN)/isort --check --quiet .
	$(BIN)/flake8 .
	@if [ -x $(BIN)/pytype ]; then $(BIN)/pytype --jobs auto pipeline scripts; \
	else echo "pytype skipped: it does not run on $$($(BIN)/python --version)"; fi

format: $(STAMP)
	$(BIN)/black --quiet .
	$(BIN)/isort --quiet .

test: lint
	$(BIN)/python -m pytest -q --durations=15

clean:
	rm -rf $(VENV) $(DEMO_DIR)
