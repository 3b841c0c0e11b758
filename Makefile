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
SHARED_DATA ?= ../shared/data
PRETRAINED_DIR ?= runs/pretrained
WEIGHTS_URL ?=
STAMP := $(VENV)/.installed

.PHONY: demo pretrained test lint format install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/compare.py --demo-dir $(DEMO_DIR) --output-dir runs/demo --seeds $(DEMO_SEEDS) --epochs $(DEMO_EPOCHS)

# The bundle's pretrained model: the defaults trained on the healthy IXI T1 cohort (seed 0; 36 training and 4
# validation subjects), evaluated on the BraTS2013 T1c development cases and exported as the Zoo bundle
# $(PRETRAINED_DIR)/cevae_ixi_t1.zip; WEIGHTS_URL is where its models/model.pt will be served (large_files.yml).
# About 15 min on 2 CPU cores. docs/benchmarks.md, "The pretrained model", has its figures.
PRETRAINED_RUN := $(PRETRAINED_DIR)/cevae_ixi_t1
# MONAI warns at every `monai.bundle run` that a config executes code (GHSA-873f-pvrv-4x83), before it reads the
# config; these are this repository's own configs, so that one warning (and only it) is silenced here
BUNDLE_RUN := $(BIN)/python -W "ignore:parsing config_file" -m monai.bundle run
pretrained: $(STAMP)
	$(BIN)/python scripts/prepare_datalist.py --layout ixi --root $(SHARED_DATA)/ixi_t1 --modality T1 --skip-incomplete \
		--out $(PRETRAINED_DIR)/datalist.json
	$(BIN)/python scripts/prepare_datalist.py --layout brats2013-deepmedic --root $(SHARED_DATA)/brats2013 --modality T1c \
		--out $(PRETRAINED_DIR)/datalist.json
	$(BUNDLE_RUN) training --config_file bundles/cevae/configs/train.json \
		--datalist $(PRETRAINED_DIR)/datalist.json --output_dir $(PRETRAINED_RUN) --run_name cevae_ixi_t1 --progress_bar False
	$(BUNDLE_RUN) evaluating \
		--config_file "['bundles/cevae/configs/train.json','bundles/cevae/configs/evaluate.json']" \
		--datalist $(PRETRAINED_DIR)/datalist.json --output_dir $(PRETRAINED_RUN) --run_name cevae_ixi_t1 \
		--label_groups "{'core': [1, 3, 4], 'oedema': [2]}" --eval_name brats2013_t1c \
		--eval_output_dir $(PRETRAINED_RUN)/brats2013_t1c
	$(BIN)/python scripts/export_bundle.py --out $(PRETRAINED_DIR)/cevae_ixi_t1.zip \
		--checkpoint $(PRETRAINED_RUN)/checkpoints/model.pt --weights-url "$(WEIGHTS_URL)" \
		--evaluation brats2013_t1c=$(PRETRAINED_RUN)/brats2013_t1c

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

# The suite in TEST_WORKERS pytest-xdist workers, each test file on one worker (its module fixtures, the trained runs
# that its tests share, are built once); the 15 slowest tests are printed at the end. 2, the cores of CI's machine, not
# xdist's "auto": a container limited to 2 cores by a CPU quota may still list all of its host's cores, and each worker
# builds the session fixtures and peaks at about 1.8 GB. On a larger machine, e.g. `make test TEST_WORKERS=8`.
TEST_WORKERS ?= 2
test: lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

clean:
	rm -rf $(VENV) $(DEMO_DIR)
