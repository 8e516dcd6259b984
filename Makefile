# Two entry points for a fresh machine: `make quickstart` and `make test` (see README.md).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# DeepSpeed JIT-compiles its CPU ops on first use; keep them inside the checkout.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.torch_extensions
# A local wheel directory (if the machine has one) supplies the CPU torch build.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: install quickstart test
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q uv
	$(BIN)/uv pip install --python $(BIN)/python $(FIND_LINKS) -c constraints-cpu.txt -e '.[test]'
	touch $@

quickstart: install
	$(BIN)/dreambooth-ray run jobs/quickstart.yaml

test: install
	$(BIN)/python -m pytest -x -q tests
