"""Callback delivery: POST the task object to its `callback_url` on every status change."""

from __future__ import annotations

import asyncio
import collections
import datetime
import heapq
import itertools
import time
import uuid
from collections.abc import Callable

import aiohttp
import orjson
from standardwebhooks.webhooks import Webhook

from ._models import TERMINAL_STATUSES, CallbackDelivery, Counters, SimTask

__all__ = ["CallbackDispatcher"]


class CallbackDispatcher:
    """Schedules and sends a task's callbacks; owns the timer and the delivery tasks.

    Status changes come due on the simulator's clock. They are delivered by one timer
    armed for the earliest (which serves the wall clock) and by `deliver_due`, which the
    simulator calls when a `ManualClock` is moved and on every API request, so a test
    that moves the clock gets the callbacks without waiting for real time.
    """

    def __init__(
        self,
        *,
        loop: asyncio.AbstractEventLoop,
        session: aiohttp.ClientSession,
        counters: Counters,
        webhook: Webhook | None,
        should_drop: Callable[[], bool],
        clock: Callable[[], float],
        log_size: int = 1000,
    ) -> None:
        self._loop = loop
        self._session = session
        self._counters = counters
        self._webhook = webhook
        self._should_drop = should_drop
        self._clock = clock
        self._due: list[tuple[float, int, str]] = []  # heap of (at, sequence, task id)
        self._sequence = itertools.count()
        self._waiting: dict[str, SimTask] = {}  # tasks with status changes still to come
        self._timer: asyncio.TimerHandle | None = None
        self._deliveries: set[asyncio.Task[None]] = set()
        self.log: collections.deque[CallbackDelivery] = collections.deque(maxlen=log_size)

    @property
    def pending(self) -> int:
        """Deliveries in progress plus tasks with status changes still to come."""
        return len(self._deliveries) + len(self._waiting)

    def schedule(self, task: SimTask) -> None:
        """Send the current status now and queue one callback per later status change."""
        if task.callback_url is None:
            return
        self._send(task, task.created_at)
        seen = {task.status_at(task.created_at)}
        for phase_at in (task.processing_at, task.finishes_at):
            status = task.status_at(phase_at)
            if status in seen:
                continue
            seen.add(status)
            heapq.heappush(self._due, (phase_at, next(self._sequence), task.task_id))
            self._waiting[task.task_id] = task
        self.deliver_due()

    def finish(self, task: SimTask) -> None:
        """The task was forced terminal: forget its status changes, send its final status."""
        self._waiting.pop(task.task_id, None)
        if task.callback_url is not None and task.forced_at is not None:
            self._send(task, task.forced_at)

    def deliver_due(self) -> None:
        """Send every status change due by the clock's time now, and re-arm the timer."""
        now = self._clock()
        due = self._due
        while due and due[0][0] <= now:
            phase_at, _, task_id = heapq.heappop(due)
            task = self._waiting.get(task_id)
            if task is None:  # forced terminal meanwhile
                continue
            if task.status_at(phase_at) in TERMINAL_STATUSES:
                del self._waiting[task_id]
            self._send(task, phase_at)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while due and due[0][2] not in self._waiting:
            heapq.heappop(due)
        if due:
            # A floor keeps a clock that lags the loop's own (or stands still) from spinning.
            delay = max(due[0][0] - now, 0.001)
            self._timer = self._loop.call_later(delay, self.deliver_due)

    def _send(self, task: SimTask, at: float) -> None:
        url = task.callback_url
        if url is None:
            return
        body = orjson.dumps(task.to_json(at))
        delivery = self._loop.create_task(self._deliver(url, body))
        self._deliveries.add(delivery)
        delivery.add_done_callback(self._deliveries.discard)

    async def _deliver(self, url: str, body: bytes) -> None:
        if self._should_drop():
            self._counters.callbacks_dropped += 1
            return
        headers = {"Content-Type": "application/json"}
        if self._webhook is not None:
            msg_id = f"msg_{uuid.uuid4().hex}"
            # Wall time on purpose: receivers check the signature's age against theirs.
            stamp = int(time.time())
            when = datetime.datetime.fromtimestamp(stamp, tz=datetime.timezone.utc)
            headers["webhook-id"] = msg_id
            headers["webhook-timestamp"] = str(stamp)
            headers["webhook-signature"] = self._webhook.sign(msg_id, when, body.decode())
        status: int | None = None
        error: str | None = None
        try:
            async with self._session.post(url, data=body, headers=headers) as response:
                await response.read()
                status = response.status
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any delivery failure is counted, never raised
            error = repr(exc)
        if status is not None and 200 <= status < 300:
            self._counters.callbacks_sent += 1
        else:
            self._counters.callbacks_failed += 1
        self.log.append(CallbackDelivery(url, body, headers, status, error))

    async def close(self) -> None:
        """Cancel the timer and every in-progress delivery, and wait for them to end."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._due.clear()
        self._waiting.clear()
        deliveries = list(self._deliveries)
        for delivery in deliveries:
            delivery.cancel()
        if deliveries:
            await asyncio.gather(*deliveries, return_exceptions=True)
        self._deliveries.clear()
