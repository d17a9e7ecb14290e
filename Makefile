# Two commands for a newcomer: `make demo` (install + run the pipeline on the embedded data) and
# `make test` (the test suite). Both use the pinned virtual environment in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CORES ?= all

.PHONY: install demo report test test-fast lint dag clean-results benchmark

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/snakemake --cores $(CORES)
	$(BIN)/snakemake --cores $(CORES) --report results/report.html --report-metadata rules/report/metadata.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -ra

test-fast: $(STAMP)
	$(BIN)/python -m pytest -ra -m "not slow and not cluster"

# Every performance figure (GPU when visible) + the embedded demo end to end; appended to BENCHMARKS.md.
benchmark: $(STAMP)
	$(BIN)/python -m cfaudit.benchmark --demo

lint: $(STAMP)
	$(BIN)/snakemake --lint

dag: $(STAMP)
	$(BIN)/snakemake --rulegraph | dot -Tpng > results/rulegraph.png

clean-results:
	rm -rf results logs benchmarks .snakemake
