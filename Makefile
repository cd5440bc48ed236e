VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch: a bare `torch` requirement can pull a multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0

.PHONY: install test lint bench bench-memory bench-batch bench-latency

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check mimi_cli tests examples benchmarks
	$(VENV)/bin/ruff format --check mimi_cli tests examples benchmarks

bench: install
	$(PY) benchmarks/speed.py

bench-memory: install
	$(PY) benchmarks/memory.py

bench-batch: install
	$(PY) benchmarks/batch.py

bench-latency: install
	$(PY) benchmarks/latency.py
