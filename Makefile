# Entry points (see README.md):
#   make run   - set up .venv and run the main job (a local DECNET swarm on loopback)
#   make test  - set up .venv and run lint, format check and the whole test suite
#   make dist  - build the wheel and the sdist into dist/ (install hosts from the wheel:
#                pip builds a source tree in place, which another user cannot write)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
STATE  ?= state

DIST   ?= dist

.PHONY: venv run test lint dist clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

run: venv
	$(BIN)/decnet-admin sandbox up --dir $(STATE)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy decnet

# The suite runs on every core up to four (pytest-xdist): most of its time is spent
# waiting on real daemons, and each test picks its own free ports and directories.
test: lint
	$(BIN)/pytest -n auto --maxprocesses=4

# setuptools' PEP 517 backend, called directly (no network, no build isolation).
dist: venv
	rm -rf $(DIST)
	$(BIN)/python -c "import sys; from setuptools import build_meta as b; out = sys.argv[1]; \
	  print(b.build_sdist(out)); print(b.build_wheel(out))" $(abspath $(DIST))
	@ls -l $(DIST)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache
