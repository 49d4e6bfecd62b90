# EdgeMT developer entry points. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.edgemt-installed
EXTRAS ?= export,tflite,coreml,compress,dev
# The onnx2tf converter route (export.tflite_converter: onnx2tf). onnx2tf pins old TensorFlow/onnx
# releases in its metadata but works with ours, so it and its small helpers install without deps.
ONNX2TF := onnx2tf==1.29.24 tf-keras==2.21.0 onnx-graphsurgeon==0.6.1 sne4onnx==2.0.1 sng4onnx==2.0.1

.PHONY: install demo report-check test test-fast lint format bench clean

install: $(STAMP)

# Re-runs only when the project's dependency files change, so a second
# `make install` takes seconds. torch/torchvision are pinned by constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(ONNX2TF)
	touch $(STAMP)

demo: install
	$(VENV)/bin/edgemt pipeline demo

# Render the demo's HTML report in headless chromium (Debian: apt-get install chromium)
# and save a screenshot next to it, to look at.
REPORT := runs/demo/report
report-check:
	test -f $(REPORT)/report.html || { echo "no $(REPORT)/report.html: run make demo first"; exit 2; }
	chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,2600 \
		--screenshot=$(REPORT)/screenshot.png file://$(CURDIR)/$(REPORT)/report.html
	@echo "screenshot: $(REPORT)/screenshot.png"

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
