"""The database URL the control's processes connect with: the runtime role's, never the owner's.

Operator commands on the control host (``toolplane migrate``, ``up``, ``tenant create``)
connect as the owner, who runs the migrations. After upgrading, ``migrate`` and ``up``
call :func:`ensure_runtime_url`, which either

- takes ``TOOLPLANE_RUNTIME_DATABASE_URL`` as it is: the deployment made that role (and
  keeps its password); nothing is created, and only the grants are applied to it; or
- makes the role ``<database>_runtime`` (ledger.roles) with a password generated once and
  kept in ``$TOOLPLANE_HOME/database/<role>.password`` (0600), set again on every run, and
  returns the owner's URL with that role and password in it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from ledger.roles import RuntimeRole, ensure_runtime_role, runtime_role_name
from toolplane.errors import SettingsError
from toolplane.settings import Settings

SETTING = "TOOLPLANE_RUNTIME_DATABASE_URL"
SECRETS_DIR = "database"  # under TOOLPLANE_HOME

__all__ = ["ensure_runtime_url", "password_path", "runtime_password"]


def password_path(home: Path, role: str) -> Path:
    return home / SECRETS_DIR / f"{role}.password"


def runtime_password(home: Path, role: str) -> str:
    """The role's password: generated the first time, then read from the same file."""
    path = password_path(home, role)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        password = path.read_text(encoding="utf-8").strip()
        if not password:
            raise SettingsError(
                f"{path} is empty; delete it and run `toolplane migrate` again (a new "
                "password is set then)",
                setting="TOOLPLANE_HOME",
            ) from None
        return password
    password = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(password + "\n")
    return password


def _named(settings: Settings, owner: URL) -> URL | None:
    if not settings.runtime_database_url:
        return None
    try:
        named = make_url(settings.runtime_database_url)
    except ArgumentError as e:
        raise SettingsError(f"not a database URL ({e})", setting=SETTING) from e
    if not named.username:
        raise SettingsError("must name the runtime role as its user", setting=SETTING)
    if named.database != owner.database:
        raise SettingsError(
            f"names database {named.database!r}, but migrations run on {owner.database!r}; "
            "both must be the same database",
            setting=SETTING,
        )
    return named


def ensure_runtime_url(settings: Settings, engine: Engine) -> tuple[str, RuntimeRole]:
    """The control's database URL, and what was done to its role; ``engine`` is the owner's."""
    owner = engine.url
    named = _named(settings, owner)
    if named is not None:
        assert named.username is not None
        role = ensure_runtime_role(engine, role=named.username, password=None)
        return settings.runtime_database_url or "", role
    if not owner.database:
        raise SettingsError("names no database", setting="TOOLPLANE_DATABASE_URL")
    name = runtime_role_name(owner.database)
    password = runtime_password(settings.home, name)
    role = ensure_runtime_role(engine, role=name, password=password)
    url = owner.set(username=name, password=password)
    return url.render_as_string(hide_password=False), role
