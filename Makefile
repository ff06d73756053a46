# dreamshard: `make demo` runs the main job, `make test` runs the tests.
# Both install into .venv first, with the exact pins of constraints.txt.

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint format benchmark clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	$(BIN)/python -c "import torch, torchvision, ray, webdataset; torchvision.ops.nms"
	touch $(STAMP)

demo: install
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/dreamshard run configs/demo.yaml

test: install
	RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled $(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

benchmark: install
	$(BIN)/python benchmarks/synthesis_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
