# `make run` and `make test` each create or refresh the virtual environment, then act.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kdflow-installed
CONFIG ?= configs/demo.yaml
# PyTorch's CPU-only wheel index: the plain PyPI pin of torch on Linux is the multi-GB CUDA build.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export TOKENIZERS_PARALLELISM ?= false

.PHONY: run test test-fast bench deploy docs install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
# One probe of the CPU index, so an unreachable one costs one line, not a pip retry warning per dependency.
	@if $(PY) -c "import urllib.request; urllib.request.urlopen('$(TORCH_INDEX)/torch/', timeout=15)" 2>/dev/null; then \
		echo "torch: from $(TORCH_INDEX)"; \
		$(PY) -m pip install -q -c constraints-cpu.txt --index-url $(TORCH_INDEX) --timeout 20 --retries 1 torch \
		|| $(PY) -m pip install -q -c constraints-cpu.txt torch; \
	else \
		echo "torch: $(TORCH_INDEX) cannot be reached; installing the constraints-cpu.txt pin from pip's configured index"; \
		$(PY) -m pip install -q -c constraints-cpu.txt torch; \
	fi
# setuptools' "Editable installation" notice (a top-level folder named like a package may shadow it) is
# informational; pip shows it as a warning on every install.
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install -q -c constraints-cpu.txt -e ".[dev]"
	$(PY) -c "import kdflow.flows.distill, kdflow.tasks.label, torch, duckdb, great_expectations, transformers"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/kdflow run -c $(CONFIG)

# Three pytest workers (pytest-xdist), each taking whole test files so a file's fixtures are built once.
# CI sets OMP_NUM_THREADS=1. On 2 cores a third worker fills the time the others spend waiting on the
# processes and Prefect servers their tests start: the suite used 184% of 2 cores against 158% with two.
PYTEST_WORKERS ?= 3
test: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile -m "not slow"

bench: $(STAMP)
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install -q -c constraints-cpu.txt -e ".[dev,bench]"
	$(PY) -m bench

# The reference pages generated from the code (docs/configuration.md, docs/cli.md); tests/test_reference.py
# fails when the committed ones differ.
docs: $(STAMP)
	$(PY) -m kdflow.cli.reference docs

# Register deployments/prefect.yaml with the server at $$PREFECT_API_URL (`kdflow ui` starts one).
deploy: $(STAMP)
	KDFLOW_PROJECT_DIR=$(CURDIR) $(VENV)/bin/prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml

clean:
	rm -rf $(VENV) .kdflow
