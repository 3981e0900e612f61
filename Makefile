# fedta: two commands on a fresh Debian/Ubuntu machine with Python >= 3.10.
#
#   make smoke   set up once, then run every notebook on the offline smoke profile (ends with report/main.pdf)
#   make test    set up once, then run the whole test suite
#
# While working: make test-quick (the unit and equivalence tests, no notebook kernels, no subprocess kills).
#
# Set-up: .venv/ with the requirements, and TeX Live from the distribution's packages for the report PDF
# (installed once where this user may: root, or sudo without a password; otherwise the PDF tests are skipped
# and the command that installs TeX is printed).
# Also: make report (build report/main.pdf from the generated figures/tables), make dry-run (runs and
#       estimated hours of the full study on this device), make bench (throughput benchmark).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RESULTS ?= results
TEX_PACKAGES := latexmk texlive-latex-base texlive-latex-recommended texlive-latex-extra \
	texlive-fonts-recommended texlive-bibtex-extra lmodern
INSTALL_TEX := sudo apt-get install -y --no-install-recommends $(TEX_PACKAGES)

.PHONY: setup tex smoke lint test test-quick report dry-run bench

$(STAMP): requirements.txt pyproject.toml
	@$(PYTHON) -c "import ensurepip, venv" 2>/dev/null || { echo "python3 -m venv is unavailable here;" \
		"install it with: sudo apt-get install -y python3-venv"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt "pytest>=7.4" "submitit>=1.5" "ruff==0.17.6"
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

tex:
	@command -v latexmk >/dev/null && exit 0; \
	if [ "$$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo"; else \
		echo "latexmk is missing and this user cannot install packages: the PDF tests are skipped and" \
			"make smoke builds no PDF. To install TeX: $(INSTALL_TEX)"; exit 0; fi; \
	command -v apt-get >/dev/null || { echo "latexmk is missing and there is no apt-get: install TeX Live" \
		"(latexmk, pdflatex) with this system's package manager"; exit 0; }; \
	echo "Installing TeX Live for the report PDF from the distribution's packages (once, a few minutes):"; \
	echo "  $(TEX_PACKAGES)"; \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
		--no-install-recommends $(TEX_PACKAGES) poppler-utils >/dev/null

setup: $(STAMP) tex

smoke: setup
	$(PY) -m fedta_utils.pipeline --profile smoke --results-dir $(RESULTS)
	@test -f report/main.pdf && echo "make smoke: done, report/main.pdf built from $(RESULTS)/smoke" || \
		echo "make smoke: done, but no PDF: latexmk is missing. To install TeX: $(INSTALL_TEX)"

# ruff's rules are in pyproject.toml; the notebooks are laid out by hand and left out. ruff is pinned:
# another version may format otherwise, and the check would fail on unchanged code.
lint: $(STAMP)
	$(PY) -m ruff format --check fedta_utils tests
	$(PY) -m ruff check fedta_utils tests

test: setup lint
	$(PY) -m pytest

test-quick: $(STAMP)
	$(PY) -m pytest -m "not slow"

report:
	cd report && latexmk -pdf -interaction=nonstopmode -halt-on-error main.tex

dry-run: $(STAMP)
	$(PY) -m fedta_utils.pipeline --profile full --dry-run

bench: $(STAMP)
	$(PY) -m fedta_utils.bench
