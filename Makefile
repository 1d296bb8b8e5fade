# tokenmill: `make demo` and `make test` set up .venv themselves (Python deps + the Rust extension).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
export VIRTUAL_ENV := $(abspath $(VENV))
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test test-rust test-python lint fmt bench develop wheel clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Dependencies come from one place: pyproject.toml's extras (what a user gets from
# `pip install 'tokenmill[EXTRAS]'`), installed by `maturin develop -E`; requirements-dev.txt adds the
# test, lint and benchmark tools and the peer libraries we compare against.
# (the extras spelled out: `all` names tokenmill itself, which pip resolves but maturin develop need not)
EXTRAS ?= train,data,cuda,plot,track,hf

$(VENV)/.stamp-dev: requirements-dev.txt | $(PY)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

$(BIN)/maturin: | $(PY)
	$(PY) -m pip install -q "maturin>=1.7,<2"

# Build the extension in release mode into the venv (incremental through ./target), with the extras.
develop: $(BIN)/maturin
	$(BIN)/maturin develop --release -q -E $(EXTRAS)

demo: develop
	$(PY) -m tokenmill demo

test: $(VENV)/.stamp-dev develop test-rust test-python

test-rust:
	cargo test --workspace --quiet

test-python:
	$(PY) -m pytest -q

# Types: mypy over the package (settings in pyproject.toml), and stubtest checks _core.pyi against the
# compiled module (hence `develop`).
lint: $(VENV)/.stamp-dev develop
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --quiet -- -D warnings
	$(BIN)/ruff check python tests benches
	$(BIN)/ruff format --check python tests benches
	$(PY) -m mypy
	MYPYPATH=python $(PY) -m mypy.stubtest tokenmill._core

fmt: $(VENV)/.stamp-dev
	cargo fmt --all
	$(BIN)/ruff format python tests benches
	$(BIN)/ruff check --fix python tests benches

bench: $(VENV)/.stamp-dev develop
	$(PY) benches/run_all.py

# The abi3 wheel (one wheel for CPython >= 3.9), e.g. to carry to a GPU machine.
wheel: $(BIN)/maturin
	$(BIN)/maturin build --release --out dist

clean:
	rm -rf target dist $(VENV)
