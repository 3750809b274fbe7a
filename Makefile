# crealia: `make run` serves the embedded default; `make test` runs lint, types and the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 3000
WS_PORT ?= 3001
DATA_DIR ?= ./crealia-data

.PHONY: setup setup-test run test lint typecheck pytest bench compare soak soak-server test-faults test-autobahn clean

setup:
	@sh scripts/bootstrap.sh

run: setup
	$(PY) -m crealia serve --host $(HOST) --port $(PORT) --ws-port $(WS_PORT) --data-dir $(DATA_DIR)

lint: setup
	$(VENV)/bin/ruff check crealia tests examples benchmarks plugins
	$(VENV)/bin/ruff format --check crealia tests examples benchmarks plugins

typecheck: setup
	$(VENV)/bin/mypy

# The tests also need what only they use (Debian's chromium for the browser tests).
setup-test:
	@sh scripts/bootstrap.sh --test

pytest: setup-test
	$(PY) -m pytest -q -p no:cacheprovider

test: setup-test lint typecheck pytest

bench: setup
	$(PY) benchmarks/fanout.py --compare-batching

# crealia against python-socketio on uvicorn, the same workloads in one run (prints the ratios).
compare: setup
	$(VENV)/bin/pip install -q -e '.[bench]'
	$(PY) benchmarks/compare.py

# A minute of flat-out writes with the WAL under its default bound (prints the figures).
soak: setup
	CREALIA_SOAK=1 $(PY) -m pytest -q -p no:cacheprovider -s -m soak tests/test_wal.py

# Ten minutes of mixed load against a real crealia serve: memory, fds, threads and the database
# sampled every 30 s, then after every client left; exits 1 when one of them does not stay bounded.
soak-server: setup
	$(PY) benchmarks/soak.py

# The full fault scenarios (tests/faults): 20 SIGKILL rounds, 10 Redis restarts of each kind,
# 1/5/30 s network drops, slow consumers, a 30 s flood; five rounds of node, Redis and
# PostgreSQL kills and an erasure under the PostgreSQL + Redis cluster
# (tests/test_cluster_postgres.py); the state machine's long runs (tests/test_state_machine.py),
# random, shrinking. Counts in test-artifacts/faults/*.json.
test-faults: setup-test
	CREALIA_FAULTS_FULL=1 $(PY) -m pytest -q -p no:cacheprovider -s -m faults_full tests/faults/ \
		tests/test_cluster_postgres.py tests/test_state_machine.py

# Autobahn|Testsuite's fuzzingclient (RFC 6455/7692) against both endpoints through the
# conformance echo: needs a Python 2.7 (CREALIA_PYTHON2, python2.7 or pyenv's); scripts/autobahn.sh
# installs wstest for it under test-artifacts/autobahn/. 52 minutes for every case
# (CREALIA_AUTOBAHN_CASES picks some, e.g. '1.*,7.*'). Reports in test-artifacts/autobahn/reports/.
test-autobahn: setup-test
	@sh scripts/autobahn.sh
	CREALIA_AUTOBAHN=1 $(PY) -m pytest -q -p no:cacheprovider -s -m autobahn tests/test_autobahn.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
