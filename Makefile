# ShardVault: `make run` starts a demo console, `make test` runs the whole suite.
# Each target installs what it needs itself through the one script .ci/install-deps
# (Debian packages when missing and running as root; Python packages into .venv).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8000
export PYTHON VENV

.PHONY: install run seed migrate test bench lint format clean

install:
	@.ci/install-deps run

migrate: install
	SHARDVAULT_DEBUG=1 $(PY) manage.py migrate --noinput

seed: migrate
	SHARDVAULT_DEBUG=1 $(PY) manage.py seed_demo
	SHARDVAULT_DEBUG=1 $(PY) manage.py housekeeping

run: seed
	@SHARDVAULT_DEBUG=1 $(PY) manage.py rqworker backups restores verify default --with-scheduler > var/worker.log 2>&1 & \
	  worker=$$!; trap "kill $$worker 2>/dev/null" EXIT INT TERM; \
	  echo ""; echo "ShardVault is running at http://127.0.0.1:$(PORT)/  (worker log: var/worker.log)"; \
	  SHARDVAULT_DEBUG=1 $(PY) manage.py demo_logins; echo ""; \
	  SHARDVAULT_DEBUG=1 $(PY) manage.py runserver 127.0.0.1:$(PORT)

test:
	@.ci/install-deps test
	$(PY) -m pytest -n 2 --dist loadgroup -q $(PYTEST_ARGS)

bench:
	@.ci/install-deps bench
	$(PY) -m pytest tests/bench -s -q -p no:xdist $(PYTEST_ARGS)

lint:
	@.ci/install-deps lint
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports --no-logo

format:
	@.ci/install-deps lint
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV)
