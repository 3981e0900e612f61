# fedta: two commands on a fresh Linux machine with Python >= 3.10.
#
#   make smoke   create .venv once, then run every notebook on the offline smoke profile
#   make test    create .venv once, then run the whole test suite
#
# Also: make report (build report/main.pdf from the generated figures/tables),
#       make dry-run (runs and estimated GPU-hours of the full study on this device),
#       make bench (throughput benchmark).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RESULTS ?= results

.PHONY: setup smoke test report dry-run bench

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt "pytest>=7.4"
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

smoke: $(STAMP)
	$(PY) -m fedta_utils.pipeline --profile smoke --results-dir $(RESULTS)

test: $(STAMP)
	$(PY) -m pytest

report:
	cd report && latexmk -pdf -interaction=nonstopmode -halt-on-error main.tex

dry-run: $(STAMP)
	$(PY) -m fedta_utils.pipeline --profile full --dry-run

bench: $(STAMP)
	$(PY) -m fedta_utils.bench
