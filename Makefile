# The Quickstart's two commands, `make demo` and `make test`: each installs what it needs, at the
# exact versions the test suite passed with (constraints.txt), then runs. `make lock` refreshes them.
PYTHON ?= python3
LOCK := constraints.txt
# The extras the suite needs; the demo needs none.
TEST_EXTRAS := test,train,server,distributed
# The PyTorch that `make lock` installs (the CPU build the suite runs on: no CUDA packages).
TORCH ?= torch==2.13.0

.PHONY: install-demo install-test demo test bench lock gpu-check

# pip installs under build/constraints.txt: the lock as it is, or, where a PyTorch is already installed
# (a GPU user's CUDA build, say), the lock without torch, triton and NVIDIA's packages, so that the
# installed PyTorch is kept with the triton it came with. Without a PyTorch the lock's own version is
# installed, which on a machine without a GPU is the CPU build.
build/constraints.txt: $(LOCK) FORCE
	@mkdir -p build
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		grep -vE '^(torch|triton|nvidia-[a-z0-9-]+)==' $(LOCK) > $@; \
	else \
		cp $(LOCK) $@; \
	fi

install-demo: build/constraints.txt
	$(PYTHON) -m pip install -c build/constraints.txt -e .

install-test: build/constraints.txt
	$(PYTHON) -m pip install -c build/constraints.txt -e ".[$(TEST_EXTRAS)]"

demo: install-demo
	$(PYTHON) -m engine.demo

test: install-test
	$(PYTHON) -m pytest -q tests

bench: install-test
	$(PYTHON) -m pytest -q benchmarks

# Resolve every dependency afresh at its newest release in a new virtual environment (build/lock-venv),
# run the suite there, and only if it passes write the versions it passed with to constraints.txt.
lock:
	$(PYTHON) -m venv --clear build/lock-venv
	build/lock-venv/bin/python -m pip install "$(TORCH)"
	build/lock-venv/bin/python -m pip install --upgrade -e ".[$(TEST_EXTRAS)]"
	build/lock-venv/bin/python -m pytest -q tests
	build/lock-venv/bin/python -m pip freeze --exclude-editable \
		| sed -E 's/\+[a-z0-9.]+$$//' > build/lock.tmp
	{ echo "# The versions the test suite passed with (make lock, $$(date -u +%F), Python $$(build/lock-venv/bin/python -c 'import platform; print(platform.python_version())'))."; \
	  echo "# pip constraints: make demo / make test install exactly these."; cat build/lock.tmp; } > $(LOCK)
	rm build/lock.tmp

# On a lent GPU machine, which carries torch, triton, transformers and pytest but may install nothing:
# no install step. See docs/gpu.md.
gpu-check:
	$(PYTHON) -m benchmarks.gpu_check

FORCE:
