# `make demo` and `make test` each create the virtual environment on a fresh machine.
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/hmf: requirements-device-serve.txt requirements-device.txt requirements-cloud.txt requirements-dev.txt pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

.PHONY: demo test lint
demo: $(BIN)/hmf
	$(BIN)/hmf simulate --out runs/demo
	$(BIN)/hmf plot runs/demo --out runs/demo/accuracy.png

test: $(BIN)/hmf
	$(BIN)/pytest -q

lint: $(BIN)/hmf
	$(BIN)/ruff check .
