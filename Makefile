# The README's commands. CI (.ci/run) calls `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint serve watch clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/vitalwire demo

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests

watch: install
	$(BIN)/vitalwire watch

clean:
	rm -rf $(VENV) vitalwire.db vitalwire.db-wal vitalwire.db-shm .pytest_cache
