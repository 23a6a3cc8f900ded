"""The embedded broker's password file: made once, kept, and never silently replaced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from control.ops.embedded import EmbeddedError, _credentials


def test_passwords_are_made_once_and_kept(tmp_path: Path) -> None:
    first = _credentials(tmp_path, ["a", "b"])
    assert (tmp_path / "users.json").stat().st_mode & 0o777 == 0o600
    assert _credentials(tmp_path, ["a", "b", "c"]) == {
        **first,
        "c": json.loads((tmp_path / "users.json").read_text())["c"],
    }
    assert _credentials(tmp_path, ["a"])["a"] == first["a"]


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"a": 1}'])
def test_a_damaged_file_is_named_not_replaced(tmp_path: Path, content: str) -> None:
    (tmp_path / "users.json").write_text(content)
    with pytest.raises(EmbeddedError, match=r"users\.json: .*toolplane down.*delete it"):
        _credentials(tmp_path, ["a"])
    assert (tmp_path / "users.json").read_text() == content  # the running server's passwords
