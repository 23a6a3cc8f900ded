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
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_password(path)
    except OSError as e:
        raise _unkept(path, e) from e
    password = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(password + "\n")
    return password


def _read_password(path: Path) -> str:
    try:
        password = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise _unkept(path, e) from e
    if not password:
        raise SettingsError(
            f"{path} is empty; delete it and run `toolplane migrate` again (a new "
            "password is set then)",
            setting="TOOLPLANE_HOME",
        )
    return password


def _unkept(path: Path, error: OSError) -> SettingsError:
    return SettingsError(
        f"cannot keep the runtime role's password in {path} ({error.strerror}); make it "
        f"readable and writable, or create the role yourself and set {SETTING}",
        setting="TOOLPLANE_HOME",
    )


def _named_role(url: str, owner: URL) -> str:
    """The role a deployment's runtime URL names, checked against the owner's URL."""
    try:
        named = make_url(url)
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
    return named.username


def ensure_runtime_url(settings: Settings, engine: Engine) -> tuple[str, RuntimeRole]:
    """The control's database URL, and what was done to its role; ``engine`` is the owner's."""
    owner = engine.url
    if settings.runtime_database_url:
        name = _named_role(settings.runtime_database_url, owner)
        role = ensure_runtime_role(engine, role=name, password=None)
        return settings.runtime_database_url, role
    if not owner.database:
        raise SettingsError("names no database", setting="TOOLPLANE_DATABASE_URL")
    name = runtime_role_name(owner.database)
    password = runtime_password(settings.home, name)
    role = ensure_runtime_role(engine, role=name, password=password)
    url = owner.set(username=name, password=password)
    return url.render_as_string(hide_password=False), role
