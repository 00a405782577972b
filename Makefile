# Two commands for a fresh machine: `make demo` and `make test`.
# Each creates .venv when missing, installs torch first and explicitly (PyTorch's CPU
# build where no NVIDIA GPU is present: PyPI's Linux wheel pulls gigabytes of CUDA
# libraries; a torch that is already there is kept), then graftlm.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: setup demo test test-fast bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.torch: | $(BIN)/python
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "keeping torch $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/pip install -q "torch==$(TORCH_VERSION)"; \
	else \
		echo "no NVIDIA GPU: installing the CPU build of torch $(TORCH_VERSION)"; \
		$(BIN)/pip install -q --retries 1 --index-url https://download.pytorch.org/whl/cpu "torch==$(TORCH_VERSION)"; \
	fi
	@touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install -q -e ".[test]"
	@touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/graft demo

test: setup
	$(BIN)/python -m pytest -q -n 2 --durations=15

test-fast: setup
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

clean:
	rm -rf $(VENV) runs bench/out
