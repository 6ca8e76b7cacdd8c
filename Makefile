# sd-parity: every target runs offline against locally generated fixtures.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sd-parity-installed

.PHONY: setup parity test test-all bench fixtures clean

setup: $(STAMP)

# torch goes in first and pinned: a bare `torch` requirement resolves to a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

fixtures: setup
	$(BIN)/parity fixtures tiny-sd1

parity: setup
	$(BIN)/parity suite --output-dir reports

test: setup
	$(BIN)/python -m pytest -q

# the fuzz tests run a short, fixed budget in `make test` and a long, random one here (tests/fuzzing.py)
test-all: setup
	SD_PARITY_FUZZ=long $(BIN)/python -m pytest -q -m 'not bench'

bench: setup
	$(BIN)/python -m pytest -q -m bench tests/benchmarks

clean:
	rm -rf reports/*.h5 reports/*.html reports/*.json reports/*.xml build
