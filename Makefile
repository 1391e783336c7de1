# The two commands of the README:  `make run`  and  `make test`.
# Each creates .venv from requirements.txt when it is missing or out of date.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= configs/default.yaml

.PHONY: setup run test check smoke bench clean-venv

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(PY) ERO_EGGROLL/arc_evolution_single_gpu.py --config $(CONFIG)

# Two pytest-xdist workers, a test file each at a time (its module fixtures stay in one process): a training run in
# the tests keeps about one core busy, so one process alone leaves half of a 2-core machine idle.
test: setup check
	$(PY) -m pytest -q -n 2 --dist loadfile

# Static checks, seconds each: lint and format, layers that import only downward, types (strict on the core).
check: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

smoke: setup
	$(PY) scripts/smoke_test.py

bench: setup
	$(PY) scripts/bench/bench_noise_bridge.py

clean-venv:
	rm -rf $(VENV)
