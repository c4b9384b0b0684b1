# ShardVault: `make run` starts a demo console, `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8000
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install run seed migrate test bench lint format clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip > $(VENV)/pip.log 2>&1 || { cat $(VENV)/pip.log; exit 1; }
	$(PY) -m pip install -q -e ".[dev]" > $(VENV)/pip.log 2>&1 || { grep -v "^WARNING: Location" $(VENV)/pip.log; exit 1; }
	$(PY) -c "import django, rq, pymysql, zstandard, playwright, boto3, yaml" 
	touch $@

install: $(VENV)/.installed

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

test: install
	$(PY) -m pytest -n 2 --dist loadgroup -q $(PYTEST_ARGS)

bench: install
	$(PY) -m pytest tests/bench -s -q -p no:xdist $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV)
