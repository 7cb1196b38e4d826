# Two entry points (README): `make run` runs the embedded default, `make test` runs the suite
# (`make test-fast` skips the slow and 2-process tests while developing).
# Both create .venv idempotently with pinned dependencies; the stamp file re-installs when the pins change.
PY        ?= python3
VENV      ?= .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.installed
# CPU machines get the CPU wheel of torch; set TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128' for CUDA.
TORCH_SPEC ?= torch==2.13.0
ARGS      ?=
# pytest-xdist workers for the suite: 0 (default) runs it in one process in file order, as CI does;
# TEST_WORKERS=2 splits it over two (README: one process 12 min 34 s on a quiet AVX512 machine; two workers 17 min 31 s on a loaded AVX2 one).
TEST_WORKERS ?= 0

.PHONY: run test test-fast docs install clean-venv

$(STAMP): pyproject.toml requirements-lock.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -c requirements-lock.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/piece-run $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -x -q -n $(TEST_WORKERS) --dist worksteal $(ARGS)

# For development: everything but the end-to-end runs (slow) and the 2-rank DeepSpeed tests (distributed),
# markers registered in pyproject.toml. `make test` stays the full suite.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -x -q -n $(TEST_WORKERS) --dist worksteal -m "not slow and not distributed" $(ARGS)

# The miniature's tables and figures in README.md and docs/ (scripts/reproduce_docs.py: the two multiruns took 14.0 and 11.8 min side by side, one thread each, on 2 AVX512 cores;
# ARGS='--render-only' re-renders the last runs without training).
docs: $(STAMP)
	$(BIN)/python scripts/reproduce_docs.py $(ARGS)

clean-venv:
	rm -rf $(VENV)
