# EdgeMT developer entry points. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.edgemt-installed
EXTRAS ?= export,dev

.PHONY: install demo test test-fast lint format bench clean

install: $(STAMP)

# Re-runs only when the project's dependency files change, so a second
# `make install` takes seconds. torch/torchvision are pinned by constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: install
	$(VENV)/bin/edgemt pipeline demo

test: install
	$(PY) -m pytest -q -ra

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install
	$(PY) benchmarks/synth_throughput.py
	$(PY) benchmarks/same_budget.py --models baseline-xs baseline-m

clean:
	rm -rf runs data .pytest_cache
