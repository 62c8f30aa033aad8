# rbe_ffn: the two commands of the README, and what they need.
#   make example   set up (venv, torch 2.13.0 CPU, build) and run the main example (examples/train_char_lm.py)
#   make test      set up, then C kernel tests under ASan/UBSan (and CUDA kernels' bodies on the CPU),
#                  CUDA compile check, pytest
# The venv gets the package as an editable install (pip install --no-build-isolation -e .), its
# dependencies from pyproject.toml; rebuilt when a C/C++/CUDA source or a build file changes.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check
DEPS   := torch==2.13.0 transformers==5.24.0 "setuptools>=77" wheel
SRC    := $(wildcard csrc/*.c csrc/*.h csrc/*.cpp cuda/*.cu cuda/*.cpp cuda/*.h) setup.py pyproject.toml
BUILT  := $(VENV)/.rbe_ffn_built

.PHONY: example test ctest cuda-check pytest asan-stress bench clean

example: $(BUILT)
	$(PY) examples/train_char_lm.py

test: ctest cuda-check pytest

$(VENV)/.deps: Makefile
	$(PYTHON) -m venv $(VENV)
	rm -f $(VENV)/lib/python*/site-packages/rbe_ffn_src.pth  # the path file of older Makefiles
	$(PIP) $(DEPS)
	touch $@

# the package: an editable install (its dependencies, metadata, python/ on the venv's path)...
$(VENV)/.rbe_ffn_installed: $(VENV)/.deps pyproject.toml setup.py
	$(PIP) --no-build-isolation -e ".[test,hf]"
	touch $@

# ...whose extension (python/rbe_ffn/_C*.so) is rebuilt in place after a source change: pip's
# editable build compiles everything in a temporary folder, this one only what changed (build/,
# which the wheel test of tests/test_packaging.py reuses too)
$(BUILT): $(VENV)/.rbe_ffn_installed $(SRC)
	$(PY) setup.py -q build_clib --force build_ext --inplace
	touch $@

# One intra-op thread unless the caller sets OMP_NUM_THREADS: the shapes are small, and on a machine
# where another process holds a core every parallel region waits for the displaced thread
# (docs/benchmarks.md, "A busy core": the suite took 20 minutes instead of 3 that way). The tests of
# thread-count independence set 1 and 2 threads themselves.
pytest: $(BUILT)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q tests

# C kernels alone, no torch, under AddressSanitizer and UndefinedBehaviorSanitizer
CTEST_FLAGS := -std=c11 -O1 -g -pthread -fsanitize=address,undefined -fno-sanitize-recover=all -Wall -Wextra -Icsrc
# glibc's vector math library, as the extension links it (setup.py): the C tests then check the
# vectorized float activations too, not only their scalar fallback
CTEST_MVEC := $(shell printf 'int main(void){return 0;}\n' | $(CC) -x c - -lmvec -o /dev/null 2>/dev/null && \
                echo -Wl,--no-as-needed -lmvec -Wl,--as-needed)
ctest: tests/c/bin/test_kernels tests/c/bin/test_few_rows tests/c/bin/test_densify
	ASAN_OPTIONS=detect_leaks=1 ./tests/c/bin/test_kernels
	# again with the entry points capped to the portable kernels (the dispatch a CPU without AVX2 takes)
	RBE_FFN_ISA=portable ASAN_OPTIONS=detect_leaks=1 ./tests/c/bin/test_kernels
	ASAN_OPTIONS=detect_leaks=1 ./tests/c/bin/test_few_rows
	ASAN_OPTIONS=detect_leaks=1 ./tests/c/bin/test_densify

tests/c/bin/test_kernels: tests/c/test_kernels.c $(wildcard csrc/*.c csrc/*.h)
	mkdir -p tests/c/bin
	$(CC) $(CTEST_FLAGS) -o $@ tests/c/test_kernels.c $(wildcard csrc/*.c) -lm $(CTEST_MVEC)

# the bodies of CUDA kernels, run on the CPU thread by thread (cuda/rbe_*.h), same sanitizers
tests/c/bin/test_%: tests/c/test_%.cpp cuda/rbe_%.h tests/c/kernel_body_test.h csrc/rbe_math.h
	mkdir -p tests/c/bin
	$(CXX) $(subst -std=c11,-std=c++17,$(CTEST_FLAGS)) -Icuda -o $@ $<

# By hand (not part of make test: ~1 min): the extension built with AddressSanitizer into
# build/asan, and tests/test_threads.py's stress (forward/backward in three threads while a
# fourth reloads state) run against it. libstdc++ is preloaded beside libasan so that ASan's
# __cxa_throw interceptor finds the real one (python itself does not link libstdc++).
ASAN_LIB := $(shell $(CC) -print-file-name=libasan.so) $(shell $(CXX) -print-file-name=libstdc++.so)
asan-stress: $(VENV)/.rbe_ffn_installed
	rm -rf build/asan
	CFLAGS="-fsanitize=address -fno-omit-frame-pointer" LDFLAGS="-fsanitize=address" $(PY) setup.py -q \
	  build_clib --build-temp build/asan/tmp --build-clib build/asan/clib \
	  build_ext --build-temp build/asan/tmp --build-lib build/asan/lib
	cp python/rbe_ffn/*.py build/asan/lib/rbe_ffn/
	PYTHONPATH=build/asan/lib LD_PRELOAD="$(ASAN_LIB)" ASAN_OPTIONS=detect_leaks=0 OMP_NUM_THREADS=1 \
	  $(PY) tests/test_threads.py 10

# every .cu compiles to an object file wherever nvcc exists (no GPU needed), and the CUDA
# registration (cuda/*.cpp) passes a syntax check against torch's headers (a CPU-only torch
# lacks one generated CUDA header: a stub stands in for it)
cuda-check: $(VENV)/.deps
	@if command -v nvcc >/dev/null 2>&1 && ls cuda/*.cu >/dev/null 2>&1; then \
	  mkdir -p build/cuda-check build/cuda-stub/c10/cuda/impl; \
	  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > build/cuda-stub/c10/cuda/impl/cuda_cmake_macros.h; \
	  cuinc=$$(nvcc -dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$$ INCLUDES="\([^"]*\)".*/\1/p' | head -1); \
	  inc=$$($(PY) -c "import sysconfig; from torch.utils.cpp_extension import include_paths; print(' '.join('-I'+p for p in include_paths() + [sysconfig.get_paths()['include']]))"); \
	  for f in cuda/*.cu; do echo "nvcc -c $$f"; nvcc -std=c++20 -O2 -Icsrc -Icuda -c $$f -o build/cuda-check/$$(basename $$f).o || exit 1; done; \
	  for f in cuda/*.cpp; do echo "c++ -fsyntax-only $$f"; $(CXX) -std=c++20 -fsyntax-only -Wall -Wno-unused-parameter -Icsrc -Icuda $$cuinc -Ibuild/cuda-stub $$inc $$f || exit 1; done; \
	else echo "cuda-check: nvcc or cuda/*.cu absent, nothing to compile"; fi

bench: $(BUILT)
	mkdir -p bench/out
	$(PY) bench/bench_cpu.py --out bench/out/cpu.md --plot bench/out/cpu_tokens.png
	$(PY) bench/bench_peers.py --out bench/out/peers.md --csv bench/out/peers.csv

clean:
	rm -rf build tests/c/bin python/rbe_ffn/_C*.so python/*.egg-info $(BUILT) $(VENV)/.rbe_ffn_installed
