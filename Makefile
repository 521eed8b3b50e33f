# asyncnode: `make run` starts the appliance, `make test` runs the whole suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install browser run test lint soak bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# This host's instance from config.toml under supervisord (by default the API and one
# worker per core) against the local RabbitMQ and Redis; Ctrl-C stops everything cleanly.
run: install
	@echo "asyncnode: http://127.0.0.1:$${ASYNCNODE_API_PORT:-5000}/"
	exec $(PY) asyncnode.py up

# The browser tests drive Debian's Chromium (Playwright's own browser download cannot work offline).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; \
	  else echo "asyncnode: chromium is not installed: browser tests will be skipped (apt-get install chromium)"; fi; }

test: install browser
	$(PY) -m pytest

# Fault injection at full size (1,000-task crash soak, RabbitMQ and Redis outages): the README's figures.
soak: install
	$(PY) bench/reliability.py

# Throughput of asyncnode, end to end and workers alone, per backend: the README's figures.
# The [bench] extras (Celery, Dramatiq) are for comparisons only; asyncnode never needs them.
bench: install
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) bench/throughput.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
