# asyncnode: `make run` starts the appliance, `make test` runs the whole suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install run test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# One API process and one worker against the local RabbitMQ and Redis; Ctrl-C stops both.
run: install
	@echo "asyncnode: http://127.0.0.1:$${ASYNCNODE_API_PORT:-5000}/"
	@trap 'kill $$worker 2>/dev/null; wait $$worker' EXIT INT TERM; \
	$(PY) asyncnode.py worker & worker=$$!; \
	$(PY) asyncnode.py api

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
