"""Issue 14 under attack, what callers and data can send: paths, schemas, addresses.

Findings of the security review (the sandbox's own in tests/security/test_i14_review.py):

- ``.env/`` (a trailing slash) passed ``no-secret-files`` (and ``src/.env/`` the prod
  approval) and read_repo_file read ``.env``: policy now denies it, and the tool too;
- a hard link in a data root was read under a name policy allows (``O_NOFOLLOW`` stops
  symlinks only);
- an approved argument schema could stall the control for hours: ``$ref`` fan-out
  (2 KB, 2**20 checks of each call's arguments), jsonschema's quadratic ``uniqueItems``;
- a fetch to a name resolving to an IPv6 address carrying a private IPv4 one (NAT64,
  6to4, IPv4-compatible) counted as public.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

import policy
from control.errors import UsageError
from control.orchestration.validation import SchemaRefused, check_args_schema, validate_args
from policy import PolicyEngine, PolicyRequest, load_bundle
from sandbox_tasks.egress import address_problem
from sandbox_tasks.registry import ToolContext
from sandbox_tasks.tools import read_repo_file
from tests.unit.test_tools import call, follow_refusal, make_ctx, read_refusal

# -- 4. hard links in a data root (LOW, fixed in safe_open) -------------------------------


def test_a_hard_link_to_a_secret_is_refused(tmp_path: Path) -> None:
    """``src/settings.txt`` and ``.env`` the same file: policy allows the path, the tool read
    the secret. A file with more than one name is refused, also by a tool that follows
    symlinks (no resolved path names the file policy would judge)."""
    ctx: ToolContext = make_ctx(tmp_path)
    root = ctx.root("repo")
    (root / ".env").write_text("SECRET=hunter2\n")
    (root / "src").mkdir()
    os.link(root / ".env", root / "src" / "settings.txt")
    failure = read_refusal(ctx, "src/settings.txt", "symlink_refused")
    assert "hard link" in failure.message and "hunter2" not in failure.message
    follow_refusal(root, "src/settings.txt", "symlink_refused")
    (root / "src" / "plain.txt").write_text("plain\n")  # a file of one name still reads
    assert call(read_repo_file.TOOL, ctx, path="src/plain.txt").content == "plain\n"


# -- 4b. a trailing slash (HIGH, fixed in safe_open) -------------------------------------

DEFAULT_BUNDLE = Path(policy.__file__).resolve().parent / "bundles" / "default"


@pytest.mark.parametrize(
    ("path", "env"),
    [(".env/", "dev"), ("src/.env/", "prod"), ("src/tls.key/", "prod"), (".env/", "prod")],
)
def test_a_trailing_slash_does_not_read_a_secret(tmp_path: Path, path: str, env: str) -> None:
    """``no-secret-files`` matches ``.env`` and ``*/.env``, not ``.env/``; the tool dropped
    the empty last component and read ``.env`` (in prod ``src/.env/`` needed no approval
    either). Now each alone stops it: policy's ``plain-paths-only`` denies a trailing ``/``,
    and the tool refuses the path (it names a directory)."""
    ctx = make_ctx(tmp_path)
    root = ctx.root("repo")
    (root / "src").mkdir()
    for secret in (".env", "src/.env", "src/tls.key"):
        (root / secret).write_text("SECRET=hunter2\n")
    decision = PolicyEngine(load_bundle(DEFAULT_BUNDLE)).decide(
        PolicyRequest(
            tenant="tn_1",
            principal="alice",
            role="submitter",
            tool="read_repo_file",
            environment=env,
            classification="internal",
            args={"path": path},
        )
    )
    assert decision.outcome == "deny" and "plain-paths-only" in decision.policies, decision
    failure = read_refusal(ctx, path, "invalid_argument")
    assert "ends with '/'" in failure.message and "hunter2" not in failure.message


# -- 5. argument schemas that stall the control (MEDIUM, fixed in validation) -------------


def fan_out(levels: int) -> dict[str, Any]:
    defs: dict[str, Any] = {
        f"d{i}": {"allOf": [{"$ref": f"#/$defs/d{i + 1}"}, {"$ref": f"#/$defs/d{i + 1}"}]}
        for i in range(levels)
    }
    defs[f"d{levels}"] = {"type": "object"}
    return {"type": "object", "properties": {"x": {"$ref": "#/$defs/d0"}}, "$defs": defs}


def test_a_schema_whose_refs_fan_out_is_refused_at_approval() -> None:
    """20 definitions that each refer twice to the next: 2 KB that passed every check, and
    2**20 subschema checks of each call's arguments (18 levels took 8.6 s here, 40 would
    take years)."""
    started = time.monotonic()
    with pytest.raises(SchemaRefused, match="expands to more than"):
        check_args_schema(fan_out(20))
    with pytest.raises(SchemaRefused, match="expands to more than|chain deeper than"):
        check_args_schema(fan_out(40))
    check_args_schema(fan_out(8))  # 2**9 subschemas: fine
    for schema, rule in (
        ({"$ref": "#"}, "refers to itself"),
        ({"$defs": {"a": {"items": {"$ref": "#/$defs/a"}}}, "$ref": "#/$defs/a"}, "itself"),
        ({"properties": {"a": {"$ref": "#/$defs/nope"}}}, "points to nothing"),
        ({"properties": {"a": {"$ref": "#name"}}}, "must be '#' or"),
    ):
        with pytest.raises(SchemaRefused, match=rule):
            check_args_schema(schema)
    assert time.monotonic() - started < 5


def test_unique_items_is_checked_in_linear_time() -> None:
    """jsonschema compares every pair of items that do not sort (objects, mixed types): a
    caller's 8000 small objects took 73 s of the control's time against an approved schema
    with ``uniqueItems``; 1 MB of arguments would take hours."""
    schema = {"type": "object", "properties": {"x": {"type": "array", "uniqueItems": True}}}
    manifest = {"name": "t", "args_schema": schema}
    check_args_schema(schema)
    started = time.monotonic()
    validate_args(manifest, {"x": [{"a": i} for i in range(100_000)]})
    validate_args(manifest, {"x": [i if i % 2 else str(i) for i in range(100_000)]})
    assert time.monotonic() - started < 10
    for same in ([1, 1.0], [{"a": 1, "b": [2]}, {"b": [2], "a": 1}], ["x", "x"]):
        with pytest.raises(UsageError, match="repeats an earlier one"):
            validate_args(manifest, {"x": same})
    for distinct in ([True, 1], [0, False], [[1], [True]], [None, False], ["1", 1]):
        validate_args(manifest, {"x": distinct})


# -- 8. IPv6 addresses that carry a private IPv4 one (LOW, fixed in egress) ---------------


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("64:ff9b::7f00:1", "loopback"),  # NAT64's well-known prefix: 127.0.0.1
        ("64:ff9b::a9fe:a9fe", "cloud metadata"),  # 169.254.169.254 through NAT64
        ("2002:7f00:1::1", "loopback"),  # 6to4 of 127.0.0.1
        ("2002:a00:1::1", "private"),  # 6to4 of 10.0.0.1
        ("::127.0.0.1", "loopback"),  # IPv4-compatible
    ],
)
def test_an_ipv6_address_carrying_a_private_one_is_refused(address: str, kind: str) -> None:
    """A name resolving to one of these passed as public (``is_global``), and where the
    network translates them (NAT64 in IPv6-only clusters, 6to4 relays) the fetch reaches
    the IPv4 address inside."""
    assert address_problem(address) == kind
    for public in ("64:ff9b::808:808", "2002:808:808::1", "2606:4700::1111", "8.8.8.8"):
        assert address_problem(public) is None, public
