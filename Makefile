# Two entry points, both self-provisioning:
#   make demo   set up .venv and run the CPU demo
#   make test   set up .venv and run the test suite (what CI runs), with a local
#               Slurm cluster when run as root

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines: the pinned version resolves to the local CPU wheel; an
# unpinned torch would pull several GB of CUDA wheels. GPU machines: set
# TORCH_SPEC to the CUDA build you want (or "" to keep a preinstalled one).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# The SGLang release whose protocol we follow. Its wheel is installed without its
# (GPU) dependencies into .cache/upstream/sglang-<version>, outside the venv: the
# contract tests judge what we send with SGLang's own code from there.
SGLANG_REFERENCE ?= 0.5.23
UPSTREAM := .cache/upstream

.PHONY: install upstream demo test clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH_SPEC),$(BIN)/pip install --quiet --quiet "$(TORCH_SPEC)")
	$(BIN)/pip install --quiet --quiet -e '.[test]'
	touch $@

install: $(BIN)/.installed

$(UPSTREAM)/sglang-$(SGLANG_REFERENCE)/.installed: | $(BIN)/.installed
	$(BIN)/pip download --quiet --quiet --no-deps --dest $(UPSTREAM) "sglang==$(SGLANG_REFERENCE)"
	$(BIN)/pip install --quiet --quiet --no-deps --no-compile --upgrade --target $(UPSTREAM)/sglang-$(SGLANG_REFERENCE) \
		$(UPSTREAM)/sglang-$(SGLANG_REFERENCE)-*.whl
	touch $@

upstream: $(UPSTREAM)/sglang-$(SGLANG_REFERENCE)/.installed

demo: install
	$(BIN)/python examples/demo_cpu.py

# tests/slurm need a Slurm cluster: as root (CI), the local one-node cluster is
# provisioned and started around the run and stopped after it; elsewhere they
# use a running cluster or skip.
test: install upstream
	slurm/local_cluster.sh run $(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .cache
