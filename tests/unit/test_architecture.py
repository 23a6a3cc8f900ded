"""The folder tree is the architecture: imports flow one way, exports stay true."""

from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_MODULE_LINES = 500

# Runs in a fresh interpreter, so that what the test process imported does not count.
PROBE = """
import importlib, json, pkgutil, sys

packages, modules, forbidden = json.loads(sys.argv[1])
names = list(modules)
for package in packages:
    root = importlib.import_module(package)
    names.append(package)
    names += [
        m.name
        for m in pkgutil.walk_packages(root.__path__, package + ".")
        if ".migrations" not in m.name and not m.name.endswith(".__main__")
    ]
for name in names:
    importlib.import_module(name)
if "sandbox_tasks.registry" in sys.modules:
    sys.modules["sandbox_tasks.registry"].load_tools()  # the plugins, too
leaked = sorted(
    m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in forbidden)
)
print(json.dumps({"imported": sorted(set(names)), "leaked": leaked}))
"""


def probe(packages: list[str], forbidden: list[str], modules: list[str] = ()) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps([packages, list(modules), forbidden])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


SANDBOX_FORBIDDEN = ["control", "ledger", "sqlalchemy", "psycopg", "alembic"]


def test_the_sandbox_plane_never_imports_control_or_the_database():
    report = probe(
        ["sandbox_tasks", "toolplane"],
        SANDBOX_FORBIDDEN,
        [
            "sandbox_tasks.worker",
            "sandbox_tasks.main",
            "sandbox_tasks.tools.search_docs",
            "sandbox_tasks.tools.read_repo_file",
            "sandbox_tasks.tools.lint_python",
            "celeryconfig",
        ],
    )
    assert {"sandbox_tasks.main", "sandbox_tasks.worker", "toolplane.keystore"} <= set(
        report["imported"]
    )
    assert report["leaked"] == [], f"the sandbox plane imports {report['leaked']}"


def test_the_worker_entry_point_loads_no_control_or_database():
    """What `toolplane-worker TOOL` (python -m sandbox_tasks) really imports."""
    report = probe(
        ["sandbox_tasks"], SANDBOX_FORBIDDEN, ["sandbox_tasks.cli", "sandbox_tasks.main"]
    )
    assert {"sandbox_tasks.cli", "sandbox_tasks.main"} <= set(report["imported"])
    assert report["leaked"] == [], f"the worker's entry point imports {report['leaked']}"


CALLER_FORBIDDEN = [
    "ledger",
    "sqlalchemy",
    "psycopg",
    "alembic",
    "control.ops.runtime",
    "control.orchestration.operations",
    "control.api.app",
    "toolplane.keystore",
    "sandbox_tasks",
]


def test_callers_load_no_database_keys_or_control_logic():
    """The Python client and the CLI's user commands are HTTP clients, nothing more."""
    report = probe([], CALLER_FORBIDDEN, ["control.client", "control.cli", "control.wire"])
    assert report["leaked"] == [], f"a caller's process imports {report['leaked']}"


def test_policy_and_toolplane_import_nothing_above_them():
    report = probe(["policy", "toolplane"], ["control", "ledger", "sandbox_tasks"])
    assert {"policy.engine", "toolplane.signing"} <= set(report["imported"])
    assert report["leaked"] == [], f"policy/toolplane import {report['leaked']}"


def test_ledger_never_imports_the_planes_above_it():
    report = probe(["ledger"], ["control", "sandbox_tasks"])
    assert "ledger.store" in report["imported"]
    assert report["leaked"] == [], f"ledger imports {report['leaked']}"


def test_the_probe_sees_a_forbidden_import():
    # The technique can fail: control's intake does reach the ledger.
    report = probe([], SANDBOX_FORBIDDEN, ["control.orchestration.intake"])
    assert "ledger" in report["leaked"]
    assert "sqlalchemy" in report["leaked"]


# -- exported members --------------------------------------------------------------

PACKAGES = ["toolplane", "policy", "ledger", "sandbox_tasks"]


@pytest.mark.parametrize("package", PACKAGES)
def test_package_exports_exist(package):
    module = importlib.import_module(package)
    exported = module.__all__
    assert exported, f"{package}.__all__ is empty"
    assert len(set(exported)) == len(exported), f"{package}.__all__ has duplicates"
    missing = [name for name in exported if not hasattr(module, name)]
    assert missing == [], f"{package}.__all__ names what it does not define: {missing}"


def submodules_with_all() -> list[str]:
    names = []
    for package in PACKAGES:
        root = importlib.import_module(package)
        names += [
            m.name
            for m in pkgutil.walk_packages(root.__path__, package + ".")
            if ".migrations" not in m.name and not m.name.endswith(".__main__")
        ]
    return sorted(n for n in names if hasattr(importlib.import_module(n), "__all__"))


@pytest.mark.parametrize("name", submodules_with_all())
def test_module_exports_exist(name):
    module = importlib.import_module(name)
    exported = module.__all__
    missing = [item for item in exported if not hasattr(module, item)]
    assert missing == [], f"{name}.__all__ names what it does not define: {missing}"
    assert len(set(exported)) == len(exported), f"{name}.__all__ has duplicates"


# -- module size -------------------------------------------------------------------


def python_modules() -> list[Path]:
    files = [ROOT / "celeryconfig.py"]
    for package in ["toolplane", "control", "sandbox_tasks", "ledger", "policy"]:
        files += sorted((ROOT / package).rglob("*.py"))
    return files


def test_the_module_list_is_real():
    names = {path.relative_to(ROOT).as_posix() for path in python_modules()}
    assert {"celeryconfig.py", "control/cli/app.py", "toolplane/canonical.py"} <= names
    assert len(names) > 30


def test_no_module_is_too_long():
    too_long = {}
    for path in python_modules():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_MODULE_LINES:
            too_long[path.relative_to(ROOT).as_posix()] = lines
    assert too_long == {}, f"modules longer than {MAX_MODULE_LINES} lines: {too_long}"


def test_ci_runs_every_test_directory() -> None:
    """`make test`, `make faults`, `make containers` and `make console-test` between them
    run every folder of tests, and CI runs all four."""
    makefile = (ROOT / "Makefile").read_text()
    targets = {}
    for target in ("test", "long", "faults", "containers", "console-test"):
        header = next(line for line in makefile.splitlines() if line.startswith(f"{target}:"))
        recipe = makefile.split(header + "\n", 1)[1].split("\n\n", 1)[0]
        targets[target] = {w for w in recipe.split("pytest", 1)[1].split() if w.startswith("tests")}
    folders = {
        str(p.parent.relative_to(ROOT))
        for p in (ROOT / "tests").rglob("test_*.py")
        if ".venv" not in p.parts
    }
    covered = targets["test"] | targets["faults"] | targets["containers"]
    covered |= targets["console-test"]

    def run_by(folder: str) -> set[str]:
        return {t for t in covered if folder == t or folder.startswith(t + "/")}

    assert all(run_by(f) for f in folders), [f for f in folders if not run_by(f)]
    assert targets["faults"] == {"tests/faults"}
    assert targets["containers"] == {"tests/containers"}
    assert targets["console-test"] == {"tests/browser"}
    assert not {"tests/containers", "tests/browser", "tests"} & targets["test"]  # stays fast
    ci = (ROOT / ".ci" / "run").read_text().split()
    assert "test" in ci and "faults" in ci and "containers" in ci and "console-test" in ci
    # `make long` runs the rest of make test's folders: the suites marked long.
    assert targets["long"] == targets["test"] and "long" in ci
    assert '-m "not long"' in makefile and "-m long tests/" in makefile


def test_every_long_suite_exists() -> None:
    """Each file named long (run by `make long`, not `make test`) is there."""
    from tests.conftest import LONG

    assert LONG and all((ROOT / name).is_file() for name in LONG), sorted(LONG)
