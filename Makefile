# Two commands for a newcomer: `make demo` (install + run the pipeline on the embedded data) and
# `make test` (the test suite). Both use the pinned virtual environment in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CORES ?= all

.PHONY: install demo smoke-fullres test test-acceptance test-fast lint dag clean-results benchmark docs

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/snakemake --cores $(CORES)
	$(BIN)/snakemake --cores $(CORES) --report results/report.html

# The seed's configuration (presets/seed.yaml: 256 px, ContextUnet, SDEdit/DDPM) with DeepDerm at 299 and the
# published GAN layout, as one DAG on the embedded data, with RANDOM weights in the published layouts placed
# through local_path + sha256 (tests/fixtures/random_weights.py). Results in runs/smoke_fullres/results/.
SMOKE := runs/smoke_fullres
SMOKE_CONFIG := presets/seed.yaml presets/smoke_fullres.yaml $(SMOKE)/weights/weights.yaml
smoke-fullres: $(STAMP)
	$(BIN)/python tests/fixtures/random_weights.py $(SMOKE)/weights
	$(BIN)/snakemake --cores $(CORES) --directory $(SMOKE) --configfile $(SMOKE_CONFIG)
	$(BIN)/snakemake --cores $(CORES) --directory $(SMOKE) --configfile $(SMOKE_CONFIG) \
		--report $(CURDIR)/$(SMOKE)/results/report.html

test: $(STAMP)
	$(BIN)/python -m pytest -ra --durations=25 -m "not acceptance"

# Acceptance runs kept out of `make test` for CI time (~13 min): the trait analysis on the demo's learned guided
# generator, the seed's configuration end to end (smoke-fullres), PGD transfer vs planted trait shifts.
test-acceptance: $(STAMP)
	$(BIN)/python -m pytest -ra -m acceptance

test-fast: $(STAMP)
	$(BIN)/python -m pytest -ra -m "not slow and not cluster"

# Every performance figure (GPU when visible) + the embedded demo end to end; appended to BENCHMARKS.md.
benchmark: $(STAMP)
	$(BIN)/python -m cfaudit.benchmark --demo

# docs/configuration.md from the config schemas (tests/test_docs.py checks it is current).
docs: $(STAMP)
	$(BIN)/python -m cfaudit.docs_config

lint: $(STAMP)
	$(BIN)/snakemake --lint

dag: $(STAMP)
	$(BIN)/snakemake --rulegraph | dot -Tpng > results/rulegraph.png

clean-results:
	rm -rf results logs benchmarks .snakemake
