# Two commands on a fresh machine:  `make demo`  and  `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 2

.PHONY: setup cluster demo test test-fast lint bench clean

setup:
	@tools/bootstrap.sh

# the SLURM executor and S3 storage plugins in the venv (README "Scaling out"); kept from then on
cluster:
	@CLUSTER=1 tools/bootstrap.sh

demo: setup
	$(BIN)/snakemake --cores $(CORES)

test: setup
	$(BIN)/python -m pytest -q tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/snakefmt --check Snakefile rules
	$(BIN)/snakemake --lint --cores 1 -n

bench: setup
	$(BIN)/python bench/run_all.py

clean:
	rm -rf results logs benchmarks .snakemake data/demo mlflow.db mlruns
