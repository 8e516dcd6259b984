# Two entry points for a fresh machine: `make quickstart` and `make test` (see README.md).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# DeepSpeed JIT-compiles its CPU ops on first use; keep them inside the checkout.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.torch_extensions
# --compile-bytecode: without .pyc files (uv writes none by default, and PYTHONDONTWRITEBYTECODE
# stops Python writing them) every Ray worker recompiles torch, diffusers and ray from source: ~12 s each.
# A local wheel directory (if the machine has one) supplies the CPU torch build.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: install quickstart test
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-cpu.txt Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q uv
	$(BIN)/uv pip install --python $(BIN)/python $(FIND_LINKS) --compile-bytecode -c constraints-cpu.txt -e '.[test]'
	touch $@

quickstart: install
	$(BIN)/dreambooth-ray run jobs/quickstart.yaml

test: install
	$(BIN)/python -m pytest -x -q tests

# On a machine with an NVIDIA GPU: the pytest `gpu` tests (quickstart-size jobs through Ray Train and
# NCCL: each precision and ZeRO stage, LoRA, the SR stage, a killed-worker resume), then the SD1.5-shape
# benchmark through Ray Train against the standalone bench. Output: benchmarks/results/gpu-check.txt and
# bench-sd15-ray.json. Stops at once, saying so, where torch sees no CUDA device.
.PHONY: gpu-check
gpu-check: install
	$(BIN)/python benchmarks/gpu_check.py
