"""Who a tool's workers are and what they hold: a directory and, as root, a user of their own.

``toolplane up`` (and anything else that plans processes with ``control.ops.processes``) gives
each tool's workers:

- their own directory, ``$TOOLPLANE_HOME/workers/<tool>/``, which becomes the worker's
  ``TOOLPLANE_HOME``: ``keys/index.json`` with only the control's and the tool's own key
  entries (public), ``keys/private/`` with only the tool's receipt key(s) that may still
  sign (``toolplane.keystore.export_keys``), and ``scratch/`` (heartbeat file, the weak
  executor's call directories). It is written again at every start and by ``keys rotate``.
- when ``up`` runs as root, an OS user of their own (``TOOLPLANE_WORKER_USER``, default
  ``toolplane-{tool}``; created with ``useradd --system`` when missing). That user owns
  its key file (0400) and ``scratch/`` (0700), and nothing else: the directories around
  them are root's, 0750 with the user's group, so a worker cannot plant a link that the
  next refresh (as root) would follow. The control's own files under HOME (keys, embedded
  Redis passwords and ACL file, database, logs, process table) are 0700/0600 and root's,
  and HOME itself is 0711: it can be crossed, not listed.
- on cgroup v1, a ``pids`` directory delegated to that user (``sandbox_tasks.cgroups``).

When ``up`` is not root, the workers run as its own user: their directories are split in
the same way, but only convention keeps a worker out of the control's files.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import pwd
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from control.ops.embedded_postgres import PG_SYSTEM_USER
from sandbox_tasks import cgroups
from toolplane.errors import SettingsError
from toolplane.keystore import KeyStore, export_keys
from toolplane.settings import Settings

log = logging.getLogger("toolplane.identities")

__all__ = [
    "WorkerIdentity",
    "describe",
    "open_runtime",
    "prepare_workers",
    "refresh_worker_keys",
    "secure_home",
    "worker_user_name",
]

SETTING = "TOOLPLANE_WORKER_USER"
USER_NAME = re.compile(r"^[a-z_][a-z0-9_-]*$")
MAX_USER_NAME = 32  # useradd's limit
CONTROL_DIRS = ("keys", "redis", "database", "logs", "run")  # the control's alone, under HOME


@dataclass(frozen=True)
class WorkerIdentity:
    """What one tool's workers run as: ``uid``/``gid`` None means the control's own user."""

    tool: str
    home: Path
    user: str | None = None
    uid: int | None = None
    gid: int | None = None

    @property
    def separated(self) -> bool:
        """The OS keeps this worker out of the control's files (it has a user of its own)."""
        return self.uid is not None


def worker_user_name(pattern: str, tool: str) -> str:
    """``pattern`` with ``{tool}`` replaced; a name longer than useradd allows is shortened to
    its first 23 characters, ``-`` and 8 hex digits of its SHA-256 (still one per tool)."""
    name = pattern.replace("{tool}", tool)
    if len(name) > MAX_USER_NAME:
        name = f"{name[:23]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    if not USER_NAME.fullmatch(name):
        raise SettingsError(
            f"{name!r} (for tool {tool!r}) is not a user name: lower-case letters, digits, "
            "'_' and '-', starting with a letter or '_'",
            setting=SETTING,
        )
    return name


def _create_user(name: str) -> pwd.struct_passwd:
    useradd = shutil.which("useradd")
    if useradd is None:
        raise SettingsError(
            f"user {name!r} does not exist and there is no useradd to create it: create it "
            "(an unprivileged system user without a login shell) or name an existing one",
            setting=SETTING,
        )
    argv = [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)  # noqa: S603
    try:  # created now, or by another `up` in the meantime
        entry = pwd.getpwnam(name)
    except KeyError:
        raise SettingsError(
            f"user {name!r} does not exist and `useradd` failed (exit {done.returncode}): "
            f"{done.stderr.strip()}",
            setting=SETTING,
        ) from None
    log.info("worker.user_created user=%s uid=%s", name, entry.pw_uid)
    return entry


def _worker_user(pattern: str, tool: str) -> pwd.struct_passwd:
    name = worker_user_name(pattern, tool)
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        entry = _create_user(name)
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise SettingsError(
            f"{name!r} is uid {entry.pw_uid}, gid {entry.pw_gid}: a worker may not run as root "
            "or in root's group",
            setting=SETTING,
        )
    if name == PG_SYSTEM_USER:
        raise SettingsError(
            f"{name!r} owns the embedded database's files: a worker may not run as it",
            setting=SETTING,
        )
    return entry


def _identities(settings: Settings, tools: Iterable[str]) -> dict[str, WorkerIdentity]:
    homes = {t: settings.home / "workers" / t for t in tools}
    if os.geteuid() != 0:
        return {t: WorkerIdentity(tool=t, home=h) for t, h in homes.items()}
    found = {}
    for tool, home in homes.items():
        entry = _worker_user(settings.worker_user, tool)
        found[tool] = WorkerIdentity(
            tool=tool, home=home, user=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid
        )
    shared = {i.user for i in found.values() if [j.uid for j in found.values()].count(i.uid) > 1}
    if shared:
        log.warning(
            "worker.shared_user users=%s: the workers of several tools run as one user, and "
            "each can read the others' receipt keys (put {tool} in %s)",
            sorted(u for u in shared if u),
            SETTING,
        )
    return found


def secure_home(home: Path) -> None:
    """HOME can be crossed (to the workers' directories and data roots put there), not
    listed; the control's directories are 0700 and the files at its top (embedded.json,
    flower-password, the embedded servers' lock) lose every group and other bit."""
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o711)
    for name in CONTROL_DIRS:
        path = home / name
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(0o700)
        elif name not in ("redis", "database"):  # made by their owners, when there is one
            path.mkdir(mode=0o700)
    for path in home.iterdir():
        with contextlib.suppress(FileNotFoundError):  # a temporary file, replaced meanwhile
            if path.is_file() and not path.is_symlink():
                path.chmod(path.stat().st_mode & 0o700)


def _directory(path: Path, mode: int, uid: int, gid: int) -> None:
    """``path`` as a real directory (never through a link) owned by ``uid:gid`` with ``mode``."""
    path.mkdir(exist_ok=True)
    if path.is_symlink() or not path.is_dir():
        raise SettingsError(f"{path} is not a plain directory", setting="TOOLPLANE_HOME")
    os.chown(path, uid, gid, follow_symlinks=False)
    path.chmod(mode)


def _prepare(identity: WorkerIdentity, store: KeyStore) -> None:
    me, us = os.geteuid(), os.getegid()
    uid = identity.uid if identity.uid is not None else me
    gid = identity.gid if identity.gid is not None else us
    _directory(identity.home.parent, 0o711, me, us)
    _directory(identity.home, 0o750, me, gid)
    _directory(identity.home / "keys", 0o750, me, gid)
    _directory(identity.home / "keys" / "private", 0o750, me, gid)
    scratch = identity.home / "scratch"
    if scratch.is_dir() and not scratch.is_symlink() and scratch.stat().st_uid != uid:
        shutil.rmtree(scratch)  # another user's leftovers (the worker user was changed)
    _directory(scratch, 0o700, uid, gid)
    dest = KeyStore(identity.home / "keys")
    signer = f"tool.{identity.tool}"
    export_keys(store, dest, public=["control"], signer=signer, owner=(uid, gid))
    dest.index_path.chmod(0o644)  # public keys only
    if identity.separated:
        cgroups.delegate(uid, gid)


def _runtime_paths(modules: Iterable[str]) -> set[Path]:
    """What a worker's user must reach to run at all: our interpreter (the file a venv's
    ``python`` links to), its installation, the venv, and the code of the tools' modules."""
    paths = {Path(os.path.realpath(sys.executable)), Path(sys.base_prefix), Path(sys.prefix)}
    for module in ("celeryconfig", "sandbox_tasks", "toolplane", *modules):
        spec = importlib.util.find_spec(module.split(".")[0])
        if spec is not None and spec.origin is not None:
            paths.add(Path(spec.origin).resolve())
    return paths


def _plugin_path_entries(modules: Iterable[str]) -> set[Path]:
    """The ``sys.path`` directories the tools' plugin packages are found in (outside the
    interpreter's installation): Python finds a module there by listing the directory."""
    installed = {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve()}
    entries = set()
    for module in modules:
        spec = importlib.util.find_spec(module.split(".")[0])
        if spec is None or spec.origin is None:
            continue
        origin = Path(spec.origin).resolve()
        entry = origin.parent.parent if origin.name == "__init__.py" else origin.parent
        if not any(entry == p or entry.is_relative_to(p) for p in installed):
            entries.add(entry)
    return entries


def open_runtime(modules: Iterable[str]) -> list[Path]:
    """As root: let other users cross (``o+x``: search, never list or read) our directories
    above the interpreter, its installation and the code, where they cannot yet (e.g. a
    Python under ``/root``, mode 0700), and list (``o+r``) the directory a plugin package
    of ``TOOLPLANE_EXTRA_TOOLS`` is found in (Python's import lists it: without, a worker
    says "No module named ..."). Returns the directories changed; a directory that is not
    ours is left alone (the worker then fails to start, naming it)."""
    opened = []
    wanted: dict[Path, int] = {}
    for path in sorted(_runtime_paths(modules)):
        for parent in [*reversed(path.parents), *([path] if path.is_dir() else [])]:
            wanted[parent] = wanted.get(parent, 0) | 0o001
    for entry in _plugin_path_entries(modules):
        wanted[entry] = wanted.get(entry, 0) | 0o005
    for directory, bits in sorted(wanted.items()):
        info = directory.stat()
        if info.st_mode & bits == bits or info.st_uid != os.geteuid():
            continue
        mode = info.st_mode & 0o7777 | bits
        directory.chmod(mode)
        opened.append(directory)
        log.warning(
            "worker.dir_opened dir=%s mode=%04o: the workers' users must reach the Python "
            "installation and the code through it (%s)",
            directory,
            mode,
            "search only, no listing" if bits == 0o001 else "listed: a plugin is found in it",
        )
    return opened


def prepare_workers(settings: Settings, tools: Iterable[str]) -> dict[str, WorkerIdentity]:
    """Users (as root) and directories of ``tools``' workers, their keys exported anew."""
    identities = _identities(settings, sorted(tools))
    secure_home(settings.home)
    if any(i.separated for i in identities.values()):
        open_runtime(settings.extra_tool_modules)
    store = KeyStore(settings.keys_dir)
    for identity in identities.values():
        _prepare(identity, store)
    return identities


def refresh_worker_keys(settings: Settings) -> list[str]:
    """Export the keys again into every worker directory that exists (after ``keys rotate``
    or ``keys revoke``, or a sync that learnt a revocation), for the user that owns its
    ``scratch/``; returns the tools refreshed. A running worker reads its index again
    before every job, so this is how a new or revoked key reaches it."""
    workers = settings.home / "workers"
    if not workers.is_dir():
        return []
    store = KeyStore(settings.keys_dir)
    done = []
    try:
        for home in sorted(p for p in workers.iterdir() if p.is_dir() and not p.is_symlink()):
            scratch = home / "scratch"
            owner = scratch.stat() if scratch.is_dir() else home.stat()
            separated = os.geteuid() == 0 and owner.st_uid != 0
            identity = WorkerIdentity(
                tool=home.name,
                home=home,
                uid=owner.st_uid if separated else None,
                gid=owner.st_gid if separated else None,
            )
            _prepare(identity, store)
            done.append(home.name)
    except OSError as e:
        raise SettingsError(
            f"cannot refresh the workers' keys under {workers}: {e}; run this as the user "
            "that ran `toolplane up`",
            setting="TOOLPLANE_HOME",
        ) from e
    return done


def describe(identities: Mapping[str, WorkerIdentity]) -> str:
    """One line for ``toolplane up``: what the workers run as, and what that enforces."""
    if not identities:
        return "no workers"
    if all(i.separated for i in identities.values()):
        users = ", ".join(f"{i.user} (uid {i.uid})" for i in identities.values())
        return f"workers run as their own users: {users}; each holds only its own key directory"
    return (
        f"workers run as this user (uid {os.geteuid()}): not root, so the OS does not keep "
        "them from the control's files; each gets only its own key directory and environment, "
        "by convention (run `toolplane up` as root for a user per tool)"
    )
