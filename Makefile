# Developer shortcuts; CI runs .ci/run (install + `python -m pytest`).
PYTHON ?= python
OUT ?= gpu_check_out

.PHONY: test lint bench gpu-check

test:
	$(PYTHON) -m pytest

lint:
	ruff check .

# Tiny CPU variants of the benchmarks (HF vs blip_fast); full GPU runs: make gpu-check.
bench:
	$(PYTHON) -m pytest benchmarks --benchmark-only

# On an H100/H200 machine: summary.md, steps.tsv and results.tar.gz in $(OUT) (benchmarks/gpu_check.sh --plan).
gpu-check:
	bash benchmarks/gpu_check.sh $(OUT)
