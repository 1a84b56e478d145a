VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test lint typecheck unit bench clean

setup:
	@bash scripts/setup_venv.sh

demo: setup
	$(BIN)/loragate demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest

unit: setup
	$(BIN)/pytest tests/unit

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
