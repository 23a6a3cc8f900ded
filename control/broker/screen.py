"""A kombu Redis transport that sets aside what is not a kombu message instead of dying on it.

A tool's workers may LPUSH onto ``results`` (control.broker.acl), so whoever runs code in a
worker can push anything there. kombu's Redis transport decodes each popped item before any
of Celery's error handling sees it: an item that is not JSON, or JSON that is not a kombu
envelope (``properties.delivery_tag``, a base64 ``body``...), raises out of the event loop and
the control's consumer exits ("Unrecoverable error"), with every other tenant's results left
unread. Its pub/sub path (events, remote control) fails the same way on a JSON value that is
not an envelope, or on JSON nested past Python's recursion limit.

``ScreenedTransport`` checks each item where it is read (the BRPOP and RPOP replies, and
pub/sub messages) against what kombu's ``Message`` needs, before kombu decodes it; then
``GuardedConsumer`` checks each task message against what the control's publishers send
(its own tasks only, protocol 2, a near ETA, no embedded callbacks). What fails is logged
(``broker.rejected``) and set aside on the capped list ``toolplane:rejected`` (its queue,
the rule it broke, its size, sha256 and first bytes), and the consumer goes on. Celery
rejects a body it cannot decode or a disallowed content type itself, and ingest records a
result it cannot verify.

Redis only: on AMQP, the broker frames each message, and kombu's decoding errors reach
Celery's own handlers.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from celery.worker.consumer import Consumer
from kombu import transport as kombu_transport
from kombu.transport import redis as kombu_redis
from kombu.utils import json as kombu_json
from kombu.utils.imports import symbol_by_name
from vine import promise

import celeryconfig

__all__ = [
    "GuardedConsumer",
    "LoggingTransport",
    "REJECTED_KEY",
    "REJECTED_KEEP",
    "ScreenedChannel",
    "ScreenedTransport",
    "envelope_problem",
    "install",
    "task_problem",
]

log = logging.getLogger("toolplane.broker")

REJECTED_KEY = "toolplane:rejected"
REJECTED_KEEP = 1000
"""How many rejected items ``toolplane:rejected`` keeps (the newest)."""
HEAD_BYTES = 512
"""How much of a rejected item is kept (its size and sha256 are kept whole)."""

TRANSPORT_PATH = "control.broker.screen:ScreenedTransport"
LOGGING_PATH = "control.broker.screen:LoggingTransport"
CONSUMER_PATH = "control.broker.screen:GuardedConsumer"


def _check_envelope(payload: Any, queue: str | None = None) -> str | None:
    """What in ``payload`` kombu would fail on, or None. ``queue``: the list it was popped
    from; its routing must name that queue (kombu restores an unacknowledged message to
    whatever its ``delivery_info`` names, with the consumer's credentials)."""
    if not isinstance(payload, dict):
        return f"not a JSON object ({type(payload).__name__})"
    properties = payload.get("properties")
    if not isinstance(properties, dict):
        return "properties: not an object"
    tag = properties.get("delivery_tag")
    if not isinstance(tag, str) or not tag:
        return "properties.delivery_tag: not a non-empty string"
    info = properties.get("delivery_info")
    if not isinstance(info, dict):
        return "properties.delivery_info: not an object"
    exchange, routing_key = info.get("exchange"), info.get("routing_key")
    if not isinstance(exchange, str) or not isinstance(routing_key, str):
        return "properties.delivery_info: exchange and routing_key must be strings"
    if queue is not None and (routing_key != queue or exchange not in ("", queue)):
        return f"properties.delivery_info: routed to {exchange!r}/{routing_key!r}, not {queue!r}"
    priority = properties.get("priority")
    if priority is not None and (type(priority) is not int or not 0 <= priority <= 255):
        return "properties.priority: not an integer from 0 to 255"
    encoding = properties.get("body_encoding")
    if encoding not in (None, "base64"):
        return f"properties.body_encoding: {encoding!r} is not base64"
    if payload.get("headers") is not None and not isinstance(payload["headers"], dict):
        return "headers: not an object"
    for name in ("content-type", "content-encoding"):
        if payload.get(name) is not None and not isinstance(payload[name], str):
            return f"{name}: not a string"
    body = payload.get("body")
    if body is None or body == "":
        return None
    if not isinstance(body, str):
        return "body: not a string"
    if encoding == "base64":
        try:
            base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return "body: not base64"
    return None


def envelope_problem(item: bytes | str, queue: str | None = None) -> str | None:
    """Why ``item`` (one message as stored in a Redis list) is not a kombu message, or None.

    Parsed as kombu parses it (``kombu.utils.json``: its ``__type__`` objects, which raise
    on an unknown type), so that what passes here also decodes there.
    """
    try:
        text = item.decode("utf-8") if isinstance(item, bytes) else item
    except UnicodeDecodeError:
        return "not UTF-8"
    try:
        payload = kombu_json.loads(text)
    except RecursionError:
        return "JSON nested too deep"
    except json.JSONDecodeError as e:
        return f"not JSON ({e.msg})"
    except (ValueError, TypeError, KeyError, OverflowError) as e:
        return f"not kombu's JSON ({type(e).__name__}: {str(e)[:80]})"
    return _check_envelope(payload, queue)


class ScreenedChannel(kombu_redis.Channel):
    """kombu's Redis channel, with every item screened where it is read (see the module)."""

    keep_rejected = True
    """Whether to keep what it rejects on ``toolplane:rejected`` (else only log it)."""
    routed_queues = frozenset({celeryconfig.RESULTS_QUEUE})
    """Queues whose messages must be routed to them: consumed with acks, so kombu restores
    what is not acknowledged to where its ``delivery_info`` says. (Remote-control replies are
    routed by a ticket, and consumed without acks.)"""

    def _create_client(self, asynchronous: bool = False) -> Any:
        client = super()._create_client(asynchronous=asynchronous)
        callbacks = client.response_callbacks
        callbacks["BRPOP"] = self._screen_popped(callbacks.get("BRPOP"))
        callbacks["RPOP"] = self._screen_item(callbacks.get("RPOP"))
        return client

    def _get(self, queue: str) -> Any:
        self._reading = queue  # for the RPOP screen: the queue its reply comes from
        try:
            return super()._get(queue)
        finally:
            self._reading = None

    def _screen_popped(self, then: Callable[..., Any] | None) -> Callable[..., Any]:
        def screen(response: Any, **options: Any) -> Any:
            if response and len(response) == 2:
                key = response[0].decode() if isinstance(response[0], bytes) else response[0]
                # a priority list is the queue + sep + priority
                if not self._passes(key.rsplit(self.sep, 1)[0], response[1]):
                    response = None  # _brpop_read: nothing was read (Empty)
            return then(response, **options) if then else response

        return screen

    def _screen_item(self, then: Callable[..., Any] | None) -> Callable[..., Any]:
        def screen(response: Any, **options: Any) -> Any:
            if response and not self._passes(getattr(self, "_reading", None), response):
                response = None
            return then(response, **options) if then else response

        return screen

    def _passes(self, queue: str | None, item: Any) -> bool:
        """Whether ``item``, read from ``queue``, may go on to kombu (else it is set aside)."""
        if not isinstance(item, bytes | str):
            return True
        routed = queue if queue in self.routed_queues else None
        problem = envelope_problem(item, routed)
        if problem is not None:
            self._set_aside(queue or "(rpop)", item, problem)
        return problem is None

    def _receive_one(self, c: Any) -> Any:
        # kombu catches an event that is not JSON (and logs it), but not one nested past the
        # recursion limit: that stops the receiver (Flower's reconnects, missing what is sent
        # meanwhile).
        try:
            return super()._receive_one(c)
        except RecursionError:
            self._set_aside("(fanout)", "(cannot be shown)", "JSON nested too deep")
            raise kombu_redis.Empty() from None

    def _deliver_fanout_message(self, message: Any, exchange: str) -> Any:
        problem = _check_envelope(message)
        if problem is not None:
            self._set_aside(f"(fanout {exchange})", _dump(message), problem)
            raise kombu_redis.Empty()
        # A well-formed envelope can still carry what its handler fails on (an event without
        # a type stops Celery's event receiver, and Flower with it). A broadcast is not acked:
        # dropping the one that failed loses nothing else.
        passes = _broker_errors(self.connection.connection_errors, self.connection.channel_errors)
        try:
            return super()._deliver_fanout_message(message, exchange)
        except passes:
            raise
        except Exception as e:
            problem = f"its handler failed ({type(e).__name__}: {e})"[:300]
            self._set_aside(f"(fanout {exchange})", _dump(message), problem)
            raise kombu_redis.Empty() from None

    def _set_aside(self, queue: str, item: bytes | str, problem: str) -> None:
        raw = item.encode("utf-8", "surrogateescape") if isinstance(item, str) else item
        record = {
            "queue": queue,
            "problem": problem,
            "size": len(raw),
            "sha256": hashlib.sha256(raw).hexdigest(),
            "head": raw[:HEAD_BYTES].decode("utf-8", "replace"),
            "at": time.time(),
        }
        log.error(
            "broker.rejected queue=%s problem=%r size=%s sha256=%s",
            queue,
            problem,
            record["size"],
            record["sha256"][:16],
        )
        if not self.keep_rejected:
            return
        try:  # on the channel's other pool: the reply being parsed holds this connection
            client = super()._create_client(asynchronous=False)
            with client.pipeline() as pipe:
                pipe.lpush(REJECTED_KEY, json.dumps(record)).ltrim(
                    REJECTED_KEY, 0, REJECTED_KEEP - 1
                )
                pipe.execute()
        except Exception:  # the log line above is the record of last resort
            log.warning("broker.rejected_not_kept queue=%s", queue, exc_info=True)


class ScreenedTransport(kombu_redis.Transport):
    Channel = ScreenedChannel


class _LoggingChannel(ScreenedChannel):
    keep_rejected = False


class LoggingTransport(kombu_redis.Transport):
    """Screened, with rejections logged only: for a user that may not write the list (Flower)."""

    Channel = _LoggingChannel


class GuardedConsumer(Consumer):
    """Celery's worker consumer, rejecting a message its task strategy cannot hydrate.

    Celery catches a message it cannot decode, an unknown task or disallowed content, but a
    well-formed envelope whose task body or headers are not what protocol 2 says (a body that
    is not ``[args, kwargs, embed]``, an ``id`` that is not a string...) raises out of the
    strategy and stops the worker ("Unrecoverable error"). This rejects that message (no
    requeue) and sets it aside as ``ScreenedChannel`` does; broker errors still propagate, so
    the consumer reconnects as before.
    """

    def create_task_handler(self, promise: Any = promise) -> Callable[[Any], Any]:
        handle = super().create_task_handler(promise)
        passes = _broker_errors(self.connection_errors, self.channel_errors)

        def refuse(message: Any, problem: str) -> None:
            channel = getattr(message, "channel", None)
            queue = (message.delivery_info or {}).get("routing_key") or "(task)"
            if isinstance(channel, ScreenedChannel):
                channel._set_aside(queue, _dump(getattr(message, "_raw", None)), problem)
            else:
                log.error("broker.rejected queue=%s problem=%r", queue, problem)
            if not message.acknowledged:
                message.reject_log_error(log, self.connection_errors)

        def on_task_received(message: Any) -> Any:
            problem = task_problem(message)
            if problem is not None:
                return refuse(message, problem)
            try:
                return handle(message)
            except passes:
                raise
            except Exception as e:  # any other failure to hydrate this one message
                return refuse(message, f"not a Celery task message ({type(e).__name__}: {e})")

        return on_task_received


_EMBEDDED = ("callbacks", "errbacks", "chain", "chord")
CONTROL_TASKS = frozenset({celeryconfig.INGEST_TASK, celeryconfig.MANIFEST_TASK})
MAX_ETA_S = 300
"""The control's own retries wait at most 30 s (control.ops.service); a later ETA is refused."""


def task_problem(message: Any) -> str | None:
    """What makes a protocol 2 task message one that no publisher of ours sends, or None.

    Only the control's own tasks (ingest, manifest), as protocol 2, with an ETA at most
    ``MAX_ETA_S`` ahead.

    The body must be ``[args, kwargs, embed]``: else Celery fails in its pool, outside the
    task, and never acknowledges the message, which comes back after every visibility timeout.
    ``embed`` must carry no callbacks, errbacks, chain or chord: a result never does, and a
    forged one would make the control send tasks of the sender's choosing. The task id must be
    a string. A body that does not decode is left to Celery, which rejects it.
    """
    headers = message.headers
    if not isinstance(headers, dict) or "task" not in headers:
        # Protocol 1 names its task in the body, where Celery would find celery.group too.
        return "headers.task: missing (not a protocol 2 task message)"
    if headers["task"] not in CONTROL_TASKS:
        # Celery's built-ins (celery.group, celery.chord_unlock...) are registered too: a
        # group would make the control publish its members wherever they say.
        return f"headers.task: {str(headers['task'])[:100]!r} is not a task the control serves"
    if not isinstance(headers.get("id"), str) or not headers["id"]:
        return "headers.id: not a non-empty string"
    eta = headers.get("eta")
    if eta is not None:
        try:
            when = datetime.fromisoformat(eta)
        except (TypeError, ValueError):
            return "headers.eta: not an ISO 8601 time"
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        if when - datetime.now(UTC) > timedelta(seconds=MAX_ETA_S):
            # Held unacknowledged, it would come back after every visibility timeout.
            return f"headers.eta: more than {MAX_ETA_S} s ahead"
    try:
        body = message.decode()
    except Exception:  # noqa: BLE001 - Celery's on_decode_error handles (and logs) it
        return None
    if not (isinstance(body, list | tuple) and len(body) == 3):
        return "body: not [args, kwargs, embed]"
    args, kwargs, embed = body
    if not isinstance(args, list | tuple):
        return "body: args not an array"
    if not isinstance(kwargs, dict):
        return "body: kwargs not an object"
    if embed is not None and not isinstance(embed, dict):
        return "body: embed not an object"
    if embed and any(embed.get(k) for k in _EMBEDDED) or set(embed or ()) - set(_EMBEDDED):
        return "body: embed carries callbacks, errbacks, a chain or a chord"
    return None


def _broker_errors(*groups: Any) -> tuple[type[BaseException], ...]:
    """The errors that mean the broker connection failed: kombu's, but KeyError (which its
    Redis transport counts among them) is a handler's failure on one message here."""
    return tuple(e for group in groups for e in group if e is not KeyError)


def _dump(raw: Any) -> str:
    try:
        return json.dumps(raw, default=repr)
    except (RecursionError, ValueError):
        return "(cannot be shown)"


def install(*, keep: bool = True) -> None:
    """Make this process's ``redis://`` and ``rediss://`` connections screened (Redis only).

    For a process of its own (the control, Flower), before its first broker connection:
    kombu's alias table names the transport of a URL scheme, so the URLs, their TLS
    handling and what Flower derives from the scheme stay kombu's. ``keep``: keep what is
    rejected on ``toolplane:rejected`` (the control), or only log it (Flower).
    """
    path = TRANSPORT_PATH if keep else LOGGING_PATH
    for scheme in ("redis", "rediss"):
        kombu_transport.TRANSPORT_ALIASES[scheme] = path
        if kombu_transport.get_transport_cls(scheme) is not symbol_by_name(path):
            raise RuntimeError(
                f"broker_screen.install: kombu already resolved {scheme}:// in this process "
                "(call it before the first broker connection)"
            )
