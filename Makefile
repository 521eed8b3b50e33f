# asyncnode: `make run` starts the appliance, `make test` runs the whole suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install browser run test screenshot lint soak bench clean

# Then byte-compile the project's own modules (cached bytecode is read even where PYTHONDONTWRITEBYTECODE
# stops Python from writing it): a process that compiles asyncnode.py at start carries ~1.4 MiB more.
install: $(STAMP)
	@$(PY) -m compileall -q asyncnode.py handlers

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

# Refresh the README's docs/dashboard.png, and the pictures of its operator's views beside it
# (docs/dashboard-search.png, -dead-letters.png, -edit.png), from the dashboard in Chromium (embedded
# backend, built-in task types). `make test` takes the same pictures into a temporary folder and leaves docs/ alone.
screenshot: install browser
	ASYNCNODE_SCREENSHOT=docs/dashboard.png $(PY) -m pytest tests/e2e/test_browser.py -k test_screenshot_with_every_state

# Fault injection at full size (1,000-task crash soak, RabbitMQ and Redis outages), then 10 minutes of schedules
# with the scheduler lease's holder SIGKILLed twice on both backends: the README's figures.
soak: install
	$(PY) bench/reliability.py
	$(PY) bench/schedules.py --parallel

# Throughput of asyncnode side by side with Celery, Dramatiq, the raw aio-pika + Redis limit and a
# minimal aiohttp API, in one alternated run (about 12 minutes), then WebSocket fan-out and RSS over
# 100,000 tasks (about 10 minutes more), then what a queue's limit and rate cost per task on both
# backends (bench/limits.py, about 4 minutes more), then what the task controls cost: unused, the release
# before them against this tree, and used, an Idempotency-Key and a delay (bench/controls.py, about 5 minutes
# more; it checks the release before out into a temporary git worktree), the same against the release before the
# metrics, logs and traces (--commit 6c958ff), then a bulk submit against single POSTs (bench/bulk.py, about 3
# minutes), then search on 100,000 tasks and what its index costs a write (bench/search.py, about 4 minutes; the
# release before the search against this tree: bench/controls.py --commit 4e28930, with --after-config
# tasks.search_words=false for the index off): the README's figures. The [bench]
# extras are for comparisons only; asyncnode never needs them. wrk (Debian's) drives the API-alone
# load; without it the harness falls back to an aiohttp client. Extra flags: make bench BENCH_ARGS='--systems raw,celery'
bench: install
	$(PY) -m pip install --quiet -e '.[bench]'
	@command -v wrk >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk >/dev/null 2>&1 || \
	      echo "asyncnode: could not install wrk: the API-alone load comes from aiohttp"; \
	  else echo "asyncnode: wrk is not installed: the API-alone load comes from aiohttp (apt-get install wrk)"; fi; }
	$(PY) bench/throughput.py $(BENCH_ARGS)
	$(PY) bench/fanout.py --rounds 3 --backend rabbitmq,embedded
	$(PY) bench/memory.py --backend rabbitmq,embedded
	$(PY) bench/limits.py --backends rabbitmq,embedded
	$(PY) bench/controls.py --backend rabbitmq,embedded
	$(PY) bench/controls.py --backend rabbitmq,embedded --commit 6c958ff
	$(PY) bench/bulk.py --backends rabbitmq,embedded
	$(PY) bench/search.py --backends rabbitmq,embedded

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
