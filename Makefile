# The Quickstart's two commands: `make demo` and `make test`. Each installs what it needs.
PYTHON ?= python3

.PHONY: install demo test bench gpu-check

# Keep an existing torch (a GPU user's CUDA build); otherwise take the pinned CPU build, which
# installs without pulling several GB of CUDA packages.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[test,train,server,distributed]"

demo: install
	$(PYTHON) -m engine.demo

test: install
	$(PYTHON) -m pytest -q tests

bench: install
	$(PYTHON) -m pytest -q benchmarks

# On a lent GPU machine, which carries torch, triton, transformers and pytest but may install nothing:
# no install step. See docs/gpu.md.
gpu-check:
	$(PYTHON) -m benchmarks.gpu_check
