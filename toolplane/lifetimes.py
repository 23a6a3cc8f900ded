"""How long a job may live, and so how long a retired key keeps verifying.

Both planes judge a key by when they *receive* a message, never by the time the
message claims. A job's life is bounded, so a key retired by rotation only has to
keep verifying what arrives for as long as a job dispatched just before the
rotation can still be in flight:

    envelope lifetime (expires_at - issued_at)     at most MAX_ENVELOPE_LIFETIME_S
    the tool's run, started just before expiry     its time limit, itself inside that bound
    the result's due slack                         RESULT_DUE_SLACK_S
    clocks of the two hosts apart by               at most CLOCK_SKEW_S

hence RETIRED_KEY_GRACE = 2 x MAX_ENVELOPE_LIFETIME_S + RESULT_DUE_SLACK_S + CLOCK_SKEW_S
(2 h 40 s). A revoked key has no grace: it verifies nothing received from its
revocation on.
"""

from __future__ import annotations

from datetime import timedelta

__all__ = [
    "CLOCK_SKEW_S",
    "MAX_ENVELOPE_LIFETIME_S",
    "RESULT_DUE_SLACK_S",
    "RETIRED_KEY_GRACE",
]

MAX_ENVELOPE_LIFETIME_S = 3600
"""The longest an envelope may live (expires_at - issued_at). A worker refuses a longer one;
the control never signs one (queue wait + visibility timeout + the tool's time limit must
fit in it)."""

CLOCK_SKEW_S = 30
"""How far apart the clocks of the control and a worker may be: an envelope issued further in
the future is refused, and a new key is trusted this long before its not_before."""

RESULT_DUE_SLACK_S = 10
"""After an envelope expired and a run that started just before could have ended: then no
worker runs the attempt any more, and its result is overdue."""

RETIRED_KEY_GRACE = timedelta(
    seconds=2 * MAX_ENVELOPE_LIFETIME_S + RESULT_DUE_SLACK_S + CLOCK_SKEW_S
)
"""How long after its retirement (rotation) a key still verifies what arrives."""
