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

.PHONY: install serve test bench
install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/zsad serve --host $${ZSAD_HOST:-0.0.0.0} --port $${ZSAD_PORT:-8000}

test: $(STAMP)
	$(VENV)/bin/python -m pytest

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/text_encoding.py
	$(VENV)/bin/python benchmarks/heatmap.py
