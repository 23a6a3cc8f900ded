"""``toolplane broker-acl``: the broker's ACL file and the per-process broker URLs it writes.

That Redis 7 accepts the file and each URL authenticates is tests/integration/test_broker_aclfile.py.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from kombu import Connection
from typer.testing import CliRunner

from control.broker import acl as brokeracl
from control.cli import app
from control.cli.broker import broker_files
from control.errors import EXIT_USAGE
from sandbox_tasks.registry import load_tools

BUILTIN = sorted(load_tools())


@pytest.fixture(autouse=True)
def _builtin_tools_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOOLPLANE_EXTRA_TOOLS", raising=False)


def run(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, ["broker-acl", *args])


def contents(directory: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(directory.iterdir())}


def acl_lines(text: str) -> dict[str, str]:
    """user name -> the rest of its aclfile line."""
    found = {}
    for line in text.splitlines():
        word, name, rest = line.split(" ", 2)
        assert word == "user" and name not in found, line
        found[name] = rest
    return found


def test_it_writes_one_url_per_process_and_an_aclfile_with_hashes_only(tmp_path):
    out = tmp_path / "broker"
    done = run(str(out))
    assert done.exit_code == 0, done.output
    expected = {f"broker_url.{p}" for p in ["control", "flower", *BUILTIN]}
    expected |= {"users.acl", "keda_password", "passwords.json"}
    assert {p.name for p in out.iterdir()} == expected
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    passwords = json.loads((out / "passwords.json").read_text())
    users = {brokeracl.CONTROL_USER, brokeracl.FLOWER_USER, brokeracl.KEDA_USER}
    users |= {brokeracl.tool_user(t) for t in BUILTIN}
    assert set(passwords) == users and len(set(passwords.values())) == len(users)

    for process, user in [
        ("control", brokeracl.CONTROL_USER),
        ("flower", brokeracl.FLOWER_USER),
        *((t, brokeracl.tool_user(t)) for t in BUILTIN),
    ]:
        url = (out / f"broker_url.{process}").read_text()
        assert url == brokeracl.url_for("redis://redis:6379/0", user, passwords[user])
        connection = Connection(url)
        assert (connection.userid, connection.password) == (user, passwords[user])
        assert (connection.hostname, connection.port, connection.virtual_host) == (
            "redis",
            6379,
            "0",
        )
    assert (out / "keda_password").read_text() == passwords[brokeracl.KEDA_USER]

    aclfile = (out / "users.acl").read_text()
    for password in passwords.values():
        assert password not in aclfile
    lines = acl_lines(aclfile)
    assert lines["default"] == "off resetkeys resetchannels -@all"
    assert lines[brokeracl.HEALTH_USER] == "on nopass resetkeys resetchannels -@all +ping"
    for user, password in passwords.items():
        assert lines[user].startswith(f"on #{brokeracl.password_sha256(password)} ")
    # The other users' rules are brokeracl's, unchanged: the same lines it renders itself.
    users = brokeracl.acl_users(BUILTIN, db=0)
    rendered = acl_lines(brokeracl.render_aclfile(users, passwords, server=(7, 4)))
    # For the Redis 7.4 of docker/ (the default): redis-py's CLIENT SETINFO is allowed.
    assert "+client|setinfo" in lines[brokeracl.tool_user("lint_python")]
    assert {k: v for k, v in lines.items() if k in rendered} == rendered
    keda = lines[brokeracl.KEDA_USER].split(" ", 2)[2]
    assert keda == "resetkeys resetchannels -@all +ping +select +llen %R~tool.*"


def test_running_it_again_changes_nothing(tmp_path):
    out = tmp_path / "broker"
    assert run(str(out)).exit_code == 0
    before = contents(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    done = run(str(out))
    assert done.exit_code == 0, done.output
    assert contents(out) == before
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes, "nothing rewritten"
    assert "wrote" not in done.output and done.output.count("unchanged") == len(before)


def test_a_new_tool_only_adds_its_user(tmp_path, monkeypatch):
    out = tmp_path / "broker"
    assert run(str(out)).exit_code == 0
    before = contents(out)
    monkeypatch.setenv("TOOLPLANE_EXTRA_TOOLS", "tests.fixture_tools")
    done = run(str(out))
    assert done.exit_code == 0, done.output
    after = contents(out)
    added = sorted(set(load_tools(["tests.fixture_tools"])) - set(BUILTIN))
    assert added and set(after) - set(before) == {f"broker_url.{t}" for t in added}
    assert {n for n in before if after[n] != before[n]} == {"users.acl", "passwords.json"}
    old, new = json.loads(before["passwords.json"]), json.loads(after["passwords.json"])
    assert {k: new[k] for k in old} == old
    assert set(new) - set(old) == {brokeracl.tool_user(t) for t in added}
    old_lines, new_lines = acl_lines(before["users.acl"]), acl_lines(after["users.acl"])
    assert {k: new_lines[k] for k in old_lines} == old_lines
    assert set(new_lines) - set(old_lines) == {brokeracl.tool_user(t) for t in added}

    # Back to the built-in tools: the extra users leave users.acl; their passwords are kept.
    monkeypatch.delenv("TOOLPLANE_EXTRA_TOOLS")
    done = run(str(out))
    assert done.exit_code == 0, done.output
    assert acl_lines((out / "users.acl").read_text()) == old_lines
    assert json.loads((out / "passwords.json").read_text()) == new
    assert f"broker_url.{added[0]}: no such process any more" in done.output


def test_database_and_tls_reach_every_url_and_the_users_rules(tmp_path):
    done = run(str(tmp_path), "--host", "redis.toolplane.svc", "--port", "6380", "--db", "3")
    assert done.exit_code == 0, done.output
    url = (tmp_path / "broker_url.lint_python").read_text()
    assert url.endswith("@redis.toolplane.svc:6380/3")
    assert "&/3.celeryev/*" in (tmp_path / "users.acl").read_text()

    done = run(str(tmp_path / "tls"), "--tls")
    assert done.exit_code == 0, done.output
    url = (tmp_path / "tls" / "broker_url.control").read_text()
    assert url.startswith("rediss://") and url.endswith("@redis:6379/0?ssl_cert_reqs=required")
    assert Connection(url).ssl["ssl_cert_reqs"].name == "CERT_REQUIRED"


def test_bad_input_is_one_line_naming_the_option(tmp_path):
    (tmp_path / "file").write_text("")
    cases = [
        (["--port", "0"], "--port: must be from 1 to 65535"),
        (["--port", "65536"], "--port: must be from 1 to 65535"),
        (["--db", "16"], "--db: must be from 0 to 15"),
        (["--db", "-1"], "--db: must be from 0 to 15"),
        (["--host", "redis/0"], "--host:"),
        (["--host", "user:pw@redis"], "--host:"),
        (["--host", ""], "--host:"),
        (["--redis-version", "6.2"], "--redis-version: must be 7.0 or newer"),
        (["--redis-version", "seven"], "--redis-version: 'seven' is not a Redis version"),
    ]
    for options, message in cases:
        done = run(str(tmp_path / "out"), *options)
        assert done.exit_code == EXIT_USAGE, (options, done.output)
        assert done.output.startswith(f"error: {message}"), (options, done.output)
        assert "Traceback" not in done.output and len(done.output.splitlines()) == 1
    assert not (tmp_path / "out").exists(), "nothing written on bad options"

    done = run(str(tmp_path / "file" / "out"))
    assert done.exit_code == EXIT_USAGE and done.output.startswith("error: OUT_DIR: cannot write")
    assert "Traceback" not in done.output

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "passwords.json").write_text('["not", "an", "object"]')
    done = run(str(tmp_path / "out"))
    assert done.exit_code == EXIT_USAGE
    assert done.output.startswith(f"error: {tmp_path / 'out' / 'passwords.json'}: must be")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["passwords.json"]


def test_broker_files_needs_every_users_password():
    passwords = {u.name: "pw" for u in brokeracl.acl_users(["a"], db=0)}
    with pytest.raises(KeyError, match=brokeracl.KEDA_USER):
        broker_files(["a"], passwords)
    files = broker_files(["a"], passwords | {brokeracl.KEDA_USER: "k"})
    assert files["broker_url.a"] == "redis://toolplane-tool-a:pw@redis:6379/0"
