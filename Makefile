# Two entry points (see README.md):
#   make run   - set up .venv and run the main job (a local DECNET swarm on loopback)
#   make test  - set up .venv and run lint, format check and the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
STATE  ?= state

.PHONY: venv run test lint clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

run: venv
	$(BIN)/decnet-admin --home $(STATE)/master init
	test -d $(STATE)/workers/demo-worker || \
		$(BIN)/decnet-admin --home $(STATE)/master enroll demo-worker \
			--address 127.0.0.1 --updater --out $(STATE)/workers/demo-worker
	$(BIN)/decnet-admin --home $(STATE)/master hosts

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
