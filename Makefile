# Quick start: `make run` (the main job on the embedded synthetic default) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TARGET ?= results/compare.json

.PHONY: run test lint dry-run clean docs

# A .venv whose stamp is there but which no longer works (a moved project: the editable install and the
# scripts' #! lines name the old path; a copied one: it imports the original's code) is rebuilt from
# scratch, not trusted for its stamp.
VENV_WORKS = $(BIN)/python -c 'import os, sys, moe_offload as m; sys.exit(os.path.realpath(m.__file__) != os.path.realpath("src/moe_offload/__init__.py"))' >/dev/null 2>&1 && $(BIN)/snakemake --version >/dev/null 2>&1 && echo ok
ifneq ($(wildcard $(STAMP)),)
ifneq ($(shell $(VENV_WORKS)),ok)
.PHONY: $(STAMP)
VENV_CLEAR := --clear
endif
endif

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV_CLEAR) $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --editable ".[workflow,dev]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/snakemake --cores 4 $(TARGET)
	@if [ "$(TARGET)" = results/compare.json ]; then $(BIN)/python -m moe_offload.analysis.summary $(TARGET); fi

docs: $(STAMP)
	$(BIN)/python -m moe_offload.config > docs/config.md

dry-run: $(STAMP)
	$(BIN)/snakemake -n $(TARGET)

lint: $(STAMP)
	$(BIN)/snakemake --lint
	$(BIN)/snakefmt --check Snakefile workflow/rules

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf results logs .snakemake
