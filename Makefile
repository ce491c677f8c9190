# eigpipe: `make demo` runs the whole study on the built-in synthetic data, `make test` the test suite.
# Both create .venv (pinned by constraints.txt) when it is missing or out of date.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CORES  ?= 2
# Rules call the `eigpipe` command: put the venv's bin first on PATH for Snakemake and its jobs.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo demo-seeds test lint bench report clean-demo gpu-wheels gpu-check

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# The demo's critical path is scratch training -> its final spectrum -> derive_widths -> the derived retrain: the
# trainings and derivations (and what they need) go first, the other jobs fill the other core.
demo: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --prioritize train_detector derive_widths
	$(BIN)/snakemake --cores $(CORES) --report results/demo/report/report.html

# The demo with three seeds per detector (train.seeds: [0, 1, 2]): every comparison with its interval over seeds.
demo-seeds: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --configfile config/config.yaml config/overlays/three-seeds.yaml
	$(BIN)/snakemake --cores $(CORES) --configfile config/config.yaml config/overlays/three-seeds.yaml \
		--report results/demo/report/report.html

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check eigpipe tests benchmarks
	$(BIN)/ruff format --check eigpipe tests benchmarks
	$(BIN)/snakemake --lint

bench: $(STAMP)
	$(BIN)/python benchmarks/covariance.py
	$(BIN)/python benchmarks/folds.py
	$(BIN)/python benchmarks/train.py
	@if [ -d results/demo/covariance ]; then $(BIN)/python benchmarks/precision.py; \
	else echo "benchmarks/precision.py skipped: it compares the demo's stores (run make demo first)"; fi

clean-demo:
	rm -rf results/demo

# The GPU check (benchmarks/gpu.py) runs on a GPU machine's own Python and torch, not in .venv: `make gpu-wheels`
# here fetches what that Python lacks (snakemake, zarr, pycocotools, ...) into .whl/; there `make gpu-check`
# installs them into .gpu-site/ and runs the check (at most 8 minutes; writes benchmarks/results/gpu.json).
gpu-wheels:
	benchmarks/gpu_wheels.sh

GPU_PYTHON ?= python3
gpu-check:
	@if ! $(GPU_PYTHON) -c "import snakemake, zarr, pycocotools" 2>/dev/null; then \
		test -d .whl || { echo "gpu-check: $(GPU_PYTHON) lacks snakemake/zarr/pycocotools: make gpu-wheels first"; exit 1; }; \
		$(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
			--target .gpu-site .whl/*.whl; fi
	PYTHONPATH=$(abspath .gpu-site)$${PYTHONPATH:+:$$PYTHONPATH} PYTHONUNBUFFERED=1 $(GPU_PYTHON) benchmarks/gpu.py $(GPU_ARGS)
