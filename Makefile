# toolplane: one entry point for people and CI.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: install test long faults check demo console-test screenshots bench images containers clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e ".[test]"
	touch $@

install: $(VENV)/.installed

# Unit, integration and security tests but the longest suites (under 10 minutes).
# promtool (Debian's prometheus package) checks docker/observability: installed here with
# apt-get if missing, as root; without it those tests skip (and fail in CI).
test: install
	-@command -v promtool >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus)
	$(PY) -m pytest -q -p no:cacheprovider -m "not long" tests/unit tests/integration tests/security

# The longest integration and security suites (tests/conftest.py LONG), ~6 minutes.
long: install
	$(PY) -m pytest -q -p no:cacheprovider -m long tests/unit tests/integration tests/security

# kill -9, Redis restarted empty, PostgreSQL stopped: dedicated servers, ~3 minutes.
faults: install
	$(PY) -m pytest -q -p no:cacheprovider tests/faults

check: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m control.cli policy test policy/bundles/default

demo: install
	$(PY) -m control.ops.demo

$(VENV)/.browser: $(VENV)/.installed
	$(PIP) install -e ".[test,browser]"
	touch $@

# The review console in a real headless Chromium against the real stack (~1-2 minutes).
# Uses Debian's chromium (installed here with apt-get if missing, as root); Playwright
# drives it, so no browser is downloaded. Writes the screenshots under docs/console/.
console-test: $(VENV)/.browser
	@test -x /usr/bin/chromium || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)
	$(PY) -m pytest -q -p no:cacheprovider tests/browser $(CONSOLE_ARGS)

# The console's screenshots in docs/console/ (shown in README), taken by the browser tests.
screenshots:
	TOOLPLANE_SCREENSHOTS=$(CURDIR)/docs/console $(MAKE) console-test

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
