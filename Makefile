# The two commands of the README: `make serve` (the service on the embedded default model) and `make test`.
# Both create .venv on first use. torch is pinned to the CPU/GPU wheel this workplace ships.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $(STAMP)

.PHONY: install serve test lint bench
install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/zsad serve --host $${ZSAD_HOST:-127.0.0.1} --port $${ZSAD_PORT:-8000}

# Lint and the architecture contracts first (seconds): a broken layer contract fails before the suite runs.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test: lint
	$(VENV)/bin/python -m pytest

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/text_encoding.py
	$(VENV)/bin/python benchmarks/heatmap.py
