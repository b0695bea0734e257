"""Callback delivery: POST the task object to its `callback_url` on every status change."""

from __future__ import annotations

import asyncio
import collections
import datetime
import time
import uuid
from collections.abc import Callable

import aiohttp
import orjson
from standardwebhooks.webhooks import Webhook

from ._models import TERMINAL_STATUSES, CallbackDelivery, Counters, SimTask

__all__ = ["CallbackDispatcher"]


class CallbackDispatcher:
    """Schedules and sends a task's callbacks; owns the timers and delivery tasks."""

    def __init__(
        self,
        *,
        loop: asyncio.AbstractEventLoop,
        session: aiohttp.ClientSession,
        counters: Counters,
        webhook: Webhook | None,
        should_drop: Callable[[], bool],
        log_size: int = 1000,
    ) -> None:
        self._loop = loop
        self._session = session
        self._counters = counters
        self._webhook = webhook
        self._should_drop = should_drop
        self._timers: dict[str, list[asyncio.TimerHandle]] = {}
        self._deliveries: set[asyncio.Task[None]] = set()
        self.log: collections.deque[CallbackDelivery] = collections.deque(maxlen=log_size)

    @property
    def pending(self) -> int:
        """Deliveries in progress plus tasks with status changes still to come."""
        return len(self._deliveries) + len(self._timers)

    def schedule(self, task: SimTask) -> None:
        """Send the current status now and schedule one callback per later status change."""
        if task.callback_url is None:
            return
        now = time.time()
        self._send(task, task.created_at)
        handles: list[asyncio.TimerHandle] = []
        seen = {task.status_at(task.created_at)}
        for phase_at in (task.processing_at, task.finishes_at):
            status = task.status_at(phase_at)
            if status in seen:
                continue
            seen.add(status)
            handle = self._loop.call_later(max(phase_at - now, 0.0), self._on_timer, task, phase_at)
            handles.append(handle)
        if handles:
            self._timers[task.task_id] = handles

    def finish(self, task: SimTask) -> None:
        """The task was forced terminal: drop its timers and send its final status now."""
        for handle in self._timers.pop(task.task_id, ()):
            handle.cancel()
        if task.callback_url is not None and task.forced_at is not None:
            self._send(task, task.forced_at)

    def _on_timer(self, task: SimTask, phase_at: float) -> None:
        if task.status_at(phase_at) in TERMINAL_STATUSES:
            self._timers.pop(task.task_id, None)
        self._send(task, phase_at)

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
        """Cancel every timer and in-progress delivery, and wait for them to end."""
        for handles in self._timers.values():
            for handle in handles:
                handle.cancel()
        self._timers.clear()
        deliveries = list(self._deliveries)
        for delivery in deliveries:
            delivery.cancel()
        if deliveries:
            await asyncio.gather(*deliveries, return_exceptions=True)
        self._deliveries.clear()
