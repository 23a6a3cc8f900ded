"""The Celery app that Flower runs (``celery -A control.broker.flower_app flower``).

Its broker is ``TOOLPLANE_BROKER_URL`` (Flower's own broker user, control.broker.acl), read from
the environment so that no password shows in a process list; it keeps its unacked keys apart
from the control's and the workers', as its ACL user requires.
"""

from __future__ import annotations

import os

from celery import Celery

import celeryconfig
from control.broker import screen as broker_screen

_url = os.environ.get("TOOLPLANE_BROKER_URL")
if not _url:
    raise SystemExit("TOOLPLANE_BROKER_URL: not set (Flower needs the broker's URL)")

broker_screen.install(keep=False)  # a tool's workers may publish anything as an event
app = Celery("toolplane-flower", set_as_current=False)
app.conf.update(
    celeryconfig.build_config(
        _url,
        visibility_timeout=int(os.environ.get("TOOLPLANE_VISIBILITY_TIMEOUT", "30")),
        unacked_owner="flower",
    )
)
