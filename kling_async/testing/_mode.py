"""The client's test mode: waits that exist for real networks, shortened for tests."""

from __future__ import annotations

from kling_async import _models, _protocol, _transport

__all__ = ["set_testing"]

#: How long "no such task" takes to become proof in test mode (see `set_testing`).
TESTING_ABSENCE_SETTLE = 0.1
#: How a client given no `poll` polls in test mode: first after 0.05 s, then at most
#: every 0.25 s (the simulator's tasks take a fraction of a second).
TESTING_POLL = _models.PollPolicy(initial=0.05, factor=1.5, max_interval=0.25)
#: The client's own backoff between tries in test mode: (first wait, longest wait).
TESTING_RETRY_WAITS = (0.01, 0.1)


def set_testing(testing: bool, *, absence_settle: float = TESTING_ABSENCE_SETTLE) -> None:
    """Switch the client's test mode on or off, for the whole process (as stamina's).

    After a create failed in a way the service may still act on (a timeout, a dropped
    connection, a 5xx), the client trusts a look-up's "no such task" only once the
    failed request can no longer arrive: `kling_async._protocol.ABSENCE_SETTLE` seconds
    (10) after the failure. Against the simulator, which never delivers a request late
    unless told to (the ``"hold"`` fault), that wait only slows tests down: test mode
    shortens it to `absence_settle` seconds. A client given no `poll` polls as
    `TESTING_POLL` does (first after 0.05 s, not 2 s), and the client's own backoff
    between tries starts at 0.01 s (not 0.5 s) and stops growing at 0.1 s (not 8 s); a
    wait the service asks for (``Retry-After``, a second after a 429) is kept. Everything
    else behaves as in production; a client given its own `poll` keeps it.

    Args:
        testing: True to switch test mode on, False to go back to the production values.
        absence_settle: the settle time in test mode, in seconds.
    """
    if absence_settle < 0:
        raise ValueError("absence_settle must not be negative")
    _protocol.set_absence_settle(absence_settle if testing else _protocol.ABSENCE_SETTLE)
    _models.set_default_poll(TESTING_POLL if testing else _models.PollPolicy())
    _transport.set_retry_waits(*(TESTING_RETRY_WAITS if testing else ()))
