# edgekit — `make help` lists the targets.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PYTHON  := $(BIN)/python
MODEL   ?= stories260k
SKIP    ?= 2
QUANT   ?= int4
OUT     ?= out

.PHONY: help install demo test lint bench clean

help:  ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  make %-18s %s\n", $$1, $$2}'

$(PYTHON):
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip

install: $(PYTHON)  ## create .venv with a CPU build of torch and edgekit (editable) + dev tools
	# torch first and pinned: the local CPU wheel, never the multi-GB CUDA build an unpinned torch pulls.
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[dev]'

demo: install  ## export the embedded stories260K model (skip 2, int4), inspect it
	$(BIN)/edgekit export $(MODEL) --skip $(SKIP) --quant $(QUANT) -o $(OUT)/demo-$(MODEL)-skip$(SKIP)-$(QUANT) --force
	$(BIN)/edgekit inspect $(OUT)/demo-$(MODEL)-skip$(SKIP)-$(QUANT)

test: install  ## run the test suite
	$(BIN)/pytest

lint: install  ## ruff lint + format check
	$(BIN)/ruff check edgekit tests bench
	$(BIN)/ruff format --check edgekit tests bench

clean:  ## remove build outputs (keeps .venv)
	rm -rf $(OUT) build dist *.egg-info .pytest_cache .ruff_cache
