# The two commands of the README. Both create or reuse the project virtual
# environment (.venv) through scripts/setup_env.sh, which is a no-op when nothing changed.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= demo_out
# Offline by design; caches of compiled code stay inside the project (ignored by git).
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DS_ACCELERATOR ?= cpu
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/.cache/inductor
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export TRITON_CACHE_DIR := $(CURDIR)/.cache/triton
export MPLBACKEND := Agg

.PHONY: setup test sanitize demo bench scale-check gpu-check lint lock newest clean

setup:
	@NOENCORE_VENV=$(VENV) bash scripts/setup_env.sh

# The suite, then the C++ op tests again on the AddressSanitizer + UBSan build (about 90 s
# more CPU time, ~45 s of it the build; `make test SANITIZE=0` skips that part).
SANITIZE ?= 1
test: setup
	NOENCORE_REQUIRE_CPP=1 $(PY) -m pytest -q tests
ifeq ($(SANITIZE),1)
	PY=$(abspath $(PY)) bash scripts/sanitize.sh
endif

# The C++ kernels under AddressSanitizer + UBSan: a second build of the extension in
# .cache/sanitize (the installed one is left alone), the op tests' C++ cases run on it with
# NOENCORE_CPU_DEBUG=1; any finding fails. scripts/sanitize.sh says how.
sanitize: setup
	PY=$(abspath $(PY)) bash scripts/sanitize.sh $(SANITIZE_ARGS)

demo: setup
	$(PY) -m noencore demo --out $(DEMO_OUT)

bench: setup
	$(PY) benchmarks/run_all.py

# Not part of `make test`: about half an hour on 2 CPU cores and ~17 GiB of memory.
scale-check: setup
	$(PY) benchmarks/scale_check.py --results

# On one CUDA GPU (not CI): op tests with real Triton, op/engine benchmarks, a ZeRO-2
# step -> gpu_check.md; exits 2 without CUDA. No `setup` first: a GPU machine may have no
# registry; scripts/gpu_check.sh installs what it lacks (see scripts/gpu_wheels.sh).
gpu-check:
	bash scripts/gpu_check.sh $(GPU_CHECK_ARGS)

# Refresh requirements.lock from requirements*.in (keeps locked versions; `make lock
# LOCK_ARGS=--upgrade` moves every package to its newest release). Not run by CI.
lock:
	bash scripts/lock.sh $(LOCK_ARGS)

# Not CI: build a second environment from the newest releases of requirements*.in, run the
# suite there and report what moved and what broke (.cache/newest/report.md).
newest:
	bash scripts/check_newest.sh $(NEWEST_ARGS)

lint: setup
	$(PY) -m ruff check noencore kernels benchmarks tests setup.py

clean:
	rm -rf build noencore/*.so $(DEMO_OUT) .cache
