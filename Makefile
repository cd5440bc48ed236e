VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch: a bare `torch` requirement can pull a multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0

.PHONY: install browser test test-portability test-gpu lint bench bench-memory bench-batch bench-gpu bench-tokenize bench-latency

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[test,report]"
	touch $@

# The report tests drive a real headless browser: Debian's chromium (playwright never downloads one).
# Where it cannot be installed (no root, no apt) those tests skip and say why.
browser:
	@command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium) \
		|| echo "chromium could not be installed: the report's browser tests will be skipped"

test: install browser
	$(PY) -m pytest -q

# The numeric tests under other machines' instruction sets: the C kernel built for x86-64-v2/v3/v4 and
# native, torch/MKL/oneDNN limited to SSE4.2, AVX2 and AVX-512 (levels this CPU lacks are listed, not run)
test-portability: install
	$(PY) tests/portability.py

# CUDA tests (skipped with the reason where no GPU is visible); -s prints the measured agreement figures
test-gpu: install
	$(PY) -m pytest -q -s -m cuda tests/test_gpu.py

lint: install
	$(VENV)/bin/ruff check mimi_cli tests examples benchmarks
	$(VENV)/bin/ruff format --check mimi_cli tests examples benchmarks

bench: install
	$(PY) benchmarks/speed.py

bench-memory: install
	$(PY) benchmarks/memory.py

bench-batch: install
	$(PY) benchmarks/batch.py

bench-gpu: install
	$(PY) benchmarks/gpu.py

bench-tokenize: install
	$(PY) benchmarks/corpus.py

bench-latency: install
	$(PY) benchmarks/latency.py
