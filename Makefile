# toolplane: one entry point for people and CI.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: install test faults check demo bench images containers clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e ".[test]"
	touch $@

install: $(VENV)/.installed

# Everything but the fault-injection suite (under 10 minutes); CI runs both.
test: install
	$(PY) -m pytest -q -p no:cacheprovider tests/unit tests/integration tests/security

# kill -9, Redis restarted empty, PostgreSQL stopped: dedicated servers, ~3 minutes.
faults: install
	$(PY) -m pytest -q -p no:cacheprovider tests/faults

check: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m control.cli policy test policy/bundles/default

demo: install
	$(PY) -m control.ops.demo

# The control and worker images, built with podman from a locally made base (no registry
# pull): docker/images.sh installs and configures podman if needed (as root).
images:
	docker/images.sh

# The compose topology as real podman containers, hardened as compose.yaml says, then
# calls, inspections and a hostile probe tool inside a worker (several minutes).
containers: install images
	docker/images.sh standins
	$(PY) -m pytest -q -rP -p no:cacheprovider tests/containers $(CONTAINERS_ARGS)

$(VENV)/.bench: $(VENV)/.installed
	$(PIP) install -e ".[test,bench]"
	touch $@

# BENCH_ARGS: e.g. --only scaling (see python -m benchmarks.run --help)
bench: $(VENV)/.bench
	$(PY) -m benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .toolplane .pytest_cache
