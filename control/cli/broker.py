"""``toolplane broker-acl``: the broker's ACL file and each process's broker URL, for containers.

    toolplane broker-acl docker/secrets/broker [--host redis] [--port 6379] [--db 0] [--tls]

writes, each mode 0600 in a directory of mode 0700 (docs/deployment.md says where each goes):

    users.acl              Redis' --aclfile: every user (control.broker.acl) with its password's
                           SHA-256, the default user off, and the health user (PING only)
    broker_url.control     redis://toolplane-control:PASSWORD@HOST:PORT/DB
    broker_url.flower      Flower's user
    broker_url.<tool>      each tool's workers' user
    keda_password          KEDA's user (LLEN of the tools' queues), the password alone
    passwords.json         every password, kept, so that running it again changes nothing and a
                           new tool only adds its user

A file whose content would not change is not written again (its owner and mode stay as the
operator set them).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated

import typer

from control.broker import acl as brokeracl
from control.cli.output import console, err
from control.cli.support import handled, load_settings
from control.errors import UsageError

__all__ = ["acl_dir_urls", "broker_acl", "broker_files"]

PASSWORDS = "passwords.json"
ACLFILE = "users.acl"
KEDA_FILE = "keda_password"
MAX_DB = 15  # Redis' default `databases 16`
HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\]")


def url_file(process: str) -> str:
    """``control``, ``flower`` or a tool's name -> the file holding that process's broker URL."""
    return f"broker_url.{process}"


def _base_url(host: str, port: int, db: int, tls: bool) -> str:
    if not HOST.fullmatch(host):
        raise UsageError(
            f"{host!r} is not a host name or an address ([...] for IPv6)", field="--host"
        )
    if not 1 <= port <= 65535:
        raise UsageError(f"must be from 1 to 65535, not {port}", field="--port")
    if not 0 <= db <= MAX_DB:
        raise UsageError(f"must be from 0 to {MAX_DB}, not {db}", field="--db")
    if tls:  # kombu and redis-py verify nothing for a bare rediss:// URL
        return f"rediss://{host}:{port}/{db}?ssl_cert_reqs=required"
    return f"redis://{host}:{port}/{db}"


def broker_files(
    tools: Iterable[str],
    passwords: Mapping[str, str],
    *,
    host: str = "redis",
    port: int = 6379,
    db: int = 0,
    tls: bool = False,
    server: tuple[int, int] = (7, 4),
) -> dict[str, str]:
    """File name -> content of every file but passwords.json; every user needs its password."""
    base = _base_url(host, port, db, tls)
    users = [*brokeracl.acl_users(tools, db=db), brokeracl.keda_user()]
    files = {ACLFILE: brokeracl.render_aclfile(users, passwords, server=server, health=True)}
    processes = {"control": brokeracl.CONTROL_USER, "flower": brokeracl.FLOWER_USER}
    processes |= {tool: brokeracl.tool_user(tool) for tool in sorted(set(tools))}
    for process, user in processes.items():
        files[url_file(process)] = brokeracl.url_for(base, user, passwords[user])
    files[KEDA_FILE] = passwords[brokeracl.KEDA_USER]
    return files


def _load_passwords(path: Path) -> dict[str, str]:
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read it: {e}", field=str(path)) from e
    if not isinstance(known, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v.strip() == v and v for k, v in known.items()
    ):
        raise UsageError(
            "must be a JSON object of user name to non-empty password", field=str(path)
        )
    return known


def _write(path: Path, content: str) -> bool:
    """Write ``content`` (mode 0600, atomically) unless the file already holds it."""
    try:
        if path.read_text(encoding="utf-8") == content:
            return False
    except FileNotFoundError:
        pass
    except OSError:  # e.g. already handed to a container's uid: replaced, so say so
        err.print(f"note: {path}: could not read it to compare; replaced", markup=False)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(content)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True


def _notes(out_dir: Path, files: Mapping[str, str], users: set[str], known: Iterable[str]) -> None:
    """Say what a tool no longer loaded left behind: its password, its URL file."""
    for user in sorted(set(known) - users):
        err.print(
            f"note: {user}: no such user any more (its tool is not loaded); "
            f"its password stays in {PASSWORDS}, it is not in {ACLFILE}",
            markup=False,
        )
    for path in sorted(out_dir.glob(url_file("*"))):
        if path.name not in files:
            err.print(f"note: {path}: no such process any more; remove it", markup=False)


@handled
def broker_acl(
    out_dir: Annotated[
        Path,
        typer.Argument(
            metavar="OUT_DIR", help="Where to write (created, mode 0700): docker/secrets/broker"
        ),
    ],
    host: Annotated[str, typer.Option(help="The broker's host, as the containers see it.")] = (
        "redis"
    ),
    port: Annotated[int, typer.Option(help="The broker's port.")] = 6379,
    db: Annotated[int, typer.Option(help=f"The broker's database (0 to {MAX_DB}).")] = 0,
    tls: Annotated[
        bool, typer.Option("--tls", help="rediss:// URLs that verify the server's certificate.")
    ] = False,
    redis_version: Annotated[
        str,
        typer.Option(help="The Redis that loads the file (MAJOR.MINOR; docker/ runs 7.4)."),
    ] = "7.4",
) -> None:
    """Write Redis' ACL file and one broker URL per process: control, Flower, each tool.

    Each tool's workers get a Redis user of their own (their queue, results write-only), so
    that no worker holds another's or the control's password. Passwords are kept in
    OUT_DIR/passwords.json: running it again changes nothing, a new tool adds its user.

    Operator command: runs where the deployment's secrets are made, not by callers.
    """
    _base_url(host, port, db, tls)  # bad options fail before anything is loaded or written
    try:
        server = brokeracl.parse_version(redis_version)
    except ValueError as e:
        raise UsageError(str(e), field="--redis-version") from e
    if server < (7, 0):
        raise UsageError(
            "must be 7.0 or newer: older Redis cannot keep a tool's workers from reading "
            "`results` (no read/write key permissions, no selectors)",
            field="--redis-version",
        )
    from sandbox_tasks.registry import load_tools

    tools = sorted(load_tools(load_settings().extra_tool_modules))
    users = {u.name for u in brokeracl.acl_users(tools, db=db)} | {brokeracl.KEDA_USER}
    try:
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        known = _load_passwords(out_dir / PASSWORDS)
        passwords = known | {u: brokeracl.new_password() for u in sorted(users - set(known))}
        # The passwords first: every hash in users.acl is then one whose password is kept.
        saved = json.dumps(passwords, indent=2, sort_keys=True) + "\n"
        changed = [PASSWORDS] if _write(out_dir / PASSWORDS, saved) else []
        files = broker_files(tools, passwords, host=host, port=port, db=db, tls=tls, server=server)
        changed += [name for name, content in files.items() if _write(out_dir / name, content)]
    except OSError as e:
        raise UsageError(
            f"cannot write there: {e.strerror or e} ({e.filename or out_dir})", field="OUT_DIR"
        ) from e
    _notes(out_dir, files, users, known)
    for name in [*sorted(files), PASSWORDS]:
        state = "wrote" if name in changed else "unchanged"
        console.print(f"{state} {out_dir / name}", markup=False)
    console.print(
        f"tools: {', '.join(tools)}. Give each file to the uid that reads it and nothing else "
        "(docs/deployment.md, 'Broker ACL users').",
        markup=False,
    )


def acl_dir_urls(directory: Path, tools: Iterable[str]) -> dict[str, str]:
    """The broker URLs ``toolplane up`` gives its processes from a directory this command wrote:
    ``worker-<tool>`` from ``broker_url.<tool>`` (each one required) and ``flower`` from
    ``broker_url.flower`` where it is there. The control keeps TOOLPLANE_BROKER_URL."""
    urls = {}
    for process, name in [*((f"worker-{t}", t) for t in tools), ("flower", "flower")]:
        path = directory / url_file(name)
        try:
            urls[process] = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            if process == "flower":
                continue
            raise UsageError(
                f"{path} is missing: run `toolplane broker-acl {directory}` with every tool",
                field="TOOLPLANE_BROKER_ACL_DIR",
            ) from None
        except OSError as e:
            raise UsageError(f"cannot read {path}: {e}", field="TOOLPLANE_BROKER_ACL_DIR") from e
    return urls
