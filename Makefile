# `make demo` and `make test` each create the virtual environment on a fresh machine.
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/hmf: requirements-device-serve.txt requirements-device.txt requirements-cloud.txt requirements-dev.txt pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

.PHONY: demo demo-all test lint
# The default (recipe hmf) and FedAvg with the default's static BatchNorm, at once on the shipped
# HAPT data, seed 0, each line prefixed with its run's name; then one plot of both.
# `make demo-all` adds HypeMeFed as published (--recipe paper): a third run, minutes longer.
# OMP_WAIT_POLICY=PASSIVE: threads that spin while they wait slow the hypernetworks' SVDs many
# times over when the two runs share the cores.
DEMO_RUNS := "hmf-default" "fedavg-sbn --strategy fedavg"
demo-all: DEMO_RUNS += "hypemefed-paper --recipe paper"
demo demo-all: $(BIN)/hmf
	rm -rf runs/demo
	mkdir -p runs/demo
	for run in $(DEMO_RUNS); do \
	  set -- $$run; name=$$1; shift; \
	  { OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1 \
	      $(BIN)/hmf simulate --out runs/demo/$$name "$$@" 2>&1; echo $$? > runs/demo/.$$name.rc; } \
	    | while IFS= read -r line; do printf '[%s] %s\n' "$$name" "$$line"; done & \
	done; wait
	dirs=; for run in $(DEMO_RUNS); do \
	  set -- $$run; test "$$(cat runs/demo/.$$1.rc 2>/dev/null)" = 0 || { echo "$$1 failed"; exit 1; }; \
	  dirs="$$dirs runs/demo/$$1"; \
	done; rm -f runs/demo/.*.rc; \
	$(BIN)/hmf plot $$dirs --out runs/demo/accuracy.png \
	  --title "make $@: HAPT by subject, 30 clients, 6 a round, 15 rounds, seed 0"

test: $(BIN)/hmf
	$(BIN)/pytest -q

lint: $(BIN)/hmf
	$(BIN)/ruff check .
