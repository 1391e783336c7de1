# The two commands of the README:  `make run`  and  `make test`.
# Each creates .venv from requirements.txt when it is missing or out of date.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= configs/default.yaml

.PHONY: setup run test smoke bench clean-venv

$(STAMP): requirements.txt pyproject.toml HyperscaleES/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(PY) ERO_EGGROLL/arc_evolution_single_gpu.py --config $(CONFIG)

test: setup
	$(PY) -m pytest -q

smoke: setup
	$(PY) scripts/smoke_test.py

bench: setup
	$(PY) scripts/bench_noise_bridge.py

clean-venv:
	rm -rf $(VENV)
