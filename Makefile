# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench clean

# Bytecode is compiled for what the suite imports, not for every installed file: pip's own compile pass
# over torch, transformers, sympy & co. is ~100 s of a 2-core machine, the imports below ~25 s
# (docs/BENCHMARKS.md). So recipes may write .pyc files even where PYTHONDONTWRITEBYTECODE is set (they
# land in the venv and in gitignored __pycache__ folders): otherwise every process recompiles its imports.
unexport PYTHONDONTWRITEBYTECODE

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --no-compile -e ".[dev]"
	$(BIN)/python -c "from lightning_synfer.scheduling.executors import preload as p; p()"
	touch $(STAMP)

install: $(STAMP)

# Processes and threads per stage come from the CPUs (pipeline.parallel: auto, lightning_synfer/hardware.py): tiny
# models run faster as several 1-thread processes than as one that spreads over the cores (docs/ARCHITECTURE.md).
demo: $(STAMP)
	$(BIN)/python run.py

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --timeout=900 tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" tests

bench: $(STAMP)
	for f in benchmarks/bench_*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) runs .cache
