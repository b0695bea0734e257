"""Time the simulator reads: the wall clock by default, or a `ManualClock` a test moves."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

__all__ = ["Clock", "ManualClock"]

Clock = Callable[[], float]
"""A zero-argument callable giving Unix time in seconds (`time.time` is one)."""


class ManualClock:
    """A clock that stands still until a test moves it: pass it as `Simulator(clock=...)`.

    Calling it returns the current time in seconds. `advance` and `set` move it forward
    (never back, as tasks and running-task counts are computed from it); a simulator
    using it delivers the callbacks that came due as soon as the clock is moved.

    Args:
        start: the initial time in Unix seconds. The default is the wall clock's time
            now, so that JWTs a client signs with the real time are still accepted
            (they expire once the clock is moved 30 minutes on, as on the service).

    Example:
        ```python
        from kling_async.testing import ManualClock

        clock = ManualClock(start=1_700_000_000.0)
        clock.advance(2.5)
        assert clock() == 1_700_000_002.5
        ```
    """

    def __init__(self, start: float | None = None) -> None:
        now = time.time() if start is None else float(start)
        if not math.isfinite(now):
            raise ValueError("start must be a finite number of seconds")
        self._now = now
        self._lock = threading.Lock()
        self._watchers: list[Callable[[], None]] = []

    def __call__(self) -> float:
        return self._now

    def __repr__(self) -> str:
        return f"ManualClock({self._now!r})"

    def advance(self, seconds: float) -> float:
        """Move the clock `seconds` forward and return the new time.

        Raises:
            ValueError: for a negative or non-finite `seconds`.
        """
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError("seconds must be a finite number >= 0")
        with self._lock:
            self._now += seconds
            now = self._now
        self._notify()
        return now

    def set(self, t: float) -> float:
        """Move the clock to Unix time `t` (not before the current time) and return it.

        Raises:
            ValueError: when `t` is earlier than the current time, or not finite.
        """
        if not math.isfinite(t):
            raise ValueError("t must be a finite number of seconds")
        with self._lock:
            if t < self._now:
                raise ValueError(f"a ManualClock does not go back (now {self._now}, asked {t})")
            self._now = float(t)
            now = self._now
        self._notify()
        return now

    def watch(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` (with no arguments, on the mover's thread) after every move.

        Returns a function that stops watching. Used by `Simulator` to deliver the
        callbacks that came due.
        """
        with self._lock:
            self._watchers.append(callback)

        def unwatch() -> None:
            with self._lock:
                if callback in self._watchers:
                    self._watchers.remove(callback)

        return unwatch

    def _notify(self) -> None:
        with self._lock:
            watchers = list(self._watchers)
        for callback in watchers:
            callback()
