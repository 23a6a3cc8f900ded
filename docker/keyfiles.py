"""Print the compose variables that name each owner's active private key file.

    .venv/bin/python docker/keyfiles.py /path/to/keys > docker/.env

``toolplane keys init`` (on a trusted machine) writes ``keys/index.json`` and
``keys/private/<key id>.key``; the file name carries the key's fingerprint, and
the key store finds a key by that name. docker/compose.yaml mounts each private
key as a secret at the same path inside the container, so it needs the names:

    TOOLPLANE_KEYS_DIR=/path/to/keys
    CONTROL_KEY_FILE=control_<fingerprint>.key
    LINT_PYTHON_KEY_FILE=tool.lint_python_<fingerprint>.key
    ...

Run it again after ``toolplane keys rotate`` and recreate the services.
"""

from __future__ import annotations

import sys
from pathlib import Path

from toolplane.keystore import KeyStore

__all__ = ["variable_for", "variables"]


def variable_for(owner: str) -> str:
    """``control`` -> ``CONTROL_KEY_FILE``; ``tool.lint_python`` -> ``LINT_PYTHON_KEY_FILE``."""
    name = owner.removeprefix("tool.")
    return f"{name.upper()}_KEY_FILE"


def variables(keys_dir: Path) -> dict[str, str]:
    """The compose variables for the key store at ``keys_dir`` (its newest active keys)."""
    store = KeyStore(keys_dir)
    active: dict[str, dict[str, str]] = {}
    for entry in store.entries():
        if entry["not_after"] is not None or entry.get("revoked_at"):
            continue
        best = active.get(entry["owner"])
        if best is None or entry["not_before"] > best["not_before"]:
            active[entry["owner"]] = entry
    if "control" not in active:
        raise SystemExit(f"error: {keys_dir}: no active control key (run `toolplane keys init`)")
    found = {"TOOLPLANE_KEYS_DIR": str(keys_dir.resolve())}
    for owner, entry in sorted(active.items()):
        # The key store's own naming, so that the two cannot drift apart.
        found[variable_for(owner)] = store._private_path(entry["key_id"]).name  # noqa: SLF001
    return found


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: keyfiles.py KEYS_DIR")
    for name, value in variables(Path(argv[0])).items():
        print(f"{name}={value}")


if __name__ == "__main__":
    main(sys.argv[1:])
