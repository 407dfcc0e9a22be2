# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv and installs
# everything itself, torch first and pinned. On Linux x86_64 PyPI's torch is the CUDA build: pip takes the
# CPU wheel where pip's configuration offers one (this project's machines keep it on disk), or from
# TORCH_INDEX where one is given (make test TORCH_INDEX=https://download.pytorch.org/whl/cpu).
PYTHON ?= python3.11
TORCH_INDEX ?=
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

IMAGE ?= llmos:$(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

.PHONY: install demo test lint faults image clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m cluster.demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The fault suite: every fault on a real local cluster, 10,000 requests from 20 teams, the input fuzzers.
faults: $(STAMP)
	@command -v redis-server >/dev/null || echo "no redis-server: the head-restart fault is skipped (apt-get install redis-server)"
	$(BIN)/llmos bench faults --json benchmarks/results/faults.json

# The image of every Ray pod on KubeRay (kubernetes.image); needs a Docker engine.
image:
	docker build -t $(IMAGE) .

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

clean-venv:
	rm -rf $(VENV)
