"""The account's resource packs: the query window, one query a second, a base URL without it.

Kling answers ``GET /account/costs`` at most once a second and filters packs by when they
were *bought*, so the window reaches far back (400 days unless told). Calls from one
client queue behind each other, each starting at least `COSTS_MIN_INTERVAL` after the
previous one was sent.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Final

from kling_async import _protocol
from kling_async._config import is_text
from kling_async._converter import parse_resource_packs
from kling_async._models import ResourcePack
from kling_async._transport import Transport
from kling_async.errors import KlingError, ValidationError

#: How far back `resource_packs` looks by default (packs are found by purchase time).
DEFAULT_LOOKBACK: Final = timedelta(days=400)


class Costs:
    """One client's resource-pack queries, spaced a second apart."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._lock: asyncio.Lock | None = None
        self._last_sent: float | None = None

    async def resource_packs(
        self, *, since: datetime | None = None, name: str | None = None
    ) -> list[ResourcePack]:
        """The packs bought since `since` (default 400 days back), named `name` if given."""
        now = datetime.now(timezone.utc)
        if since is None:
            since = now - DEFAULT_LOOKBACK
        elif not isinstance(since, datetime):
            raise ValidationError("since", "must be a datetime", since)
        if name is not None and not is_text(name):
            raise ValidationError("name", "must be a non-empty string", name)
        path = _protocol.costs_path(_millis(since), _millis(now), name)
        if self._lock is None:  # made inside the running loop, on first use
            self._lock = asyncio.Lock()
        async with self._lock:  # one query at a time, so the spacing holds
            try:
                data, _ = await self._transport.retrying(self._send_spaced, "GET", path)
            except KlingError as error:
                missing = _protocol.costs_not_offered(error, self._transport.base_url)
                if missing is not None:
                    raise missing from None
                raise
        return parse_resource_packs(data)

    async def _send_spaced(self, method: str, path: str) -> tuple[Any, str | None]:
        # Every try (a retry too) is a query: each waits out the second since the last
        # one's *answer* (or failure). The service counts arrivals: the last query
        # arrived before it was answered, so this spacing holds there too, however
        # long a request spent on the way (a send-to-send spacing would not).
        if self._last_sent is not None:
            wait = self._last_sent + _protocol.COSTS_MIN_INTERVAL - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        try:
            return await self._transport.send(method, path)
        finally:
            self._last_sent = time.monotonic()


def _millis(moment: datetime) -> int:
    # A naive datetime is local time, as `datetime.timestamp` reads it.
    return int(moment.timestamp() * 1000)
