"""Hostile input to each built-in tool, through the whole path: CLI, policy,
signed job, sandboxed worker, receipt, ledger. Each gets its own clear error
code (or a usage error before anything is dispatched), nothing blocks, and the
ledger verifies afterwards."""

from __future__ import annotations

import json

import pytest

from tests.harness import Stack

pytestmark = pytest.mark.integration


def call(stack: Stack, token: str, tool: str, *args: str) -> tuple[int, dict]:
    done = stack.cli("call", tool, *args, "--wait", "--json", token=token, timeout=60)
    body = json.loads(done.stdout) if done.stdout.strip() else {"stderr": done.stderr}
    return done.returncode, body


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("../../etc/passwd", "path_outside_root"),
        ("/etc/passwd", "path_outside_root"),
        ("hostile/passwd", "symlink_refused"),
        ("hostile/etc/passwd", "symlink_refused"),
        ("hostile/up/etc/passwd", "symlink_refused"),
        ("hostile/zero", "symlink_refused"),
        ("hostile/fifo", "invalid_argument"),
        ("hostile", "invalid_argument"),
        ("hostile/big.txt", "too_large"),
        ("hostile/binary.bin", "invalid_argument"),
        ("hostile/latin1.txt", "invalid_argument"),
        ("no/such/file.py", "not_found"),
        ("a/" * 1000 + "b", "not_found"),
    ],
)
def test_read_repo_file_refuses_with_its_own_code(
    stack: Stack, token: str, path: str, code: str
) -> None:
    status, run = call(stack, token, "read_repo_file", "--arg", f"path={path}")
    assert status == 4, run
    node = run["nodes"][0]
    assert node["status"] == "failed"
    assert node["error"]["code"] == code, node["error"]
    assert node["receipt"]["key_id"].startswith("tool.read_repo_file:")


def test_read_repo_file_over_long_path_is_a_usage_error(stack: Stack, token: str) -> None:
    status, body = call(stack, token, "read_repo_file", "--arg", "path=" + "a" * 5000)
    assert status == 2 and body["stderr"].startswith("error: --arg path:")


@pytest.mark.parametrize(
    "query",
    ['"', "AND OR NOT", "*", "NEAR(a b)", "col:x", "'; DROP TABLE docs; --", "ledger" * 150],
)
def test_search_docs_takes_any_query(stack: Stack, token: str, query: str) -> None:
    status, run = call(stack, token, "search_docs", "--arg", f"query={query}")
    node = run["nodes"][0]
    assert status in (0, 4), run
    if status == 4:
        assert node["error"]["code"] == "invalid_argument"
    else:
        assert isinstance(node["result"]["hits"], list)


def test_search_docs_bounds(stack: Stack, token: str) -> None:
    status, run = call(stack, token, "search_docs", "--arg", "query=   ")
    assert status == 4 and run["nodes"][0]["error"]["code"] == "invalid_argument"
    for top_k in ("0", "51"):
        status, body = call(
            stack, token, "search_docs", "--arg", "query=x", "--arg", f"top_k={top_k}"
        )
        assert status == 2 and "top_k" in body["stderr"]


def test_lint_python_hostile_code(stack: Stack, token: str) -> None:
    from control.errors import UsageError

    client = stack.client(token)
    with pytest.raises(UsageError, match="--arg code: NUL characters are not accepted"):
        client.call("lint_python", {"code": "x = 1\x00"}, wait=True)
    # code that would do harm if it ran is only read
    view = client.call(
        "lint_python", {"code": "import os\nos.system('touch /tmp/pwned-by-lint')\n"}, wait=True
    )
    assert view.status == "completed" and view.nodes[0].result["count"] >= 1
    status, body = call(stack, token, "lint_python", "--arg", "code=x", "--arg", 'select=["ALL"]')
    assert status == 4 and "select" in json.dumps(body)
    assert stack.client(token).verify_ledger().ok
