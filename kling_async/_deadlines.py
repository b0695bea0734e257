"""Waiting with a time limit without ever losing a cancellation.

`asyncio.wait_for` on Python 3.10 and 3.11 swallows a cancellation that arrives just as
the awaited thing finishes (it returns the result instead; fixed in 3.12). A batch
worker that loses its cancellation that way keeps polling, and the batch's shutdown
waits for it forever. `within` cannot: on 3.11+ it is `asyncio.timeout`, which tells
its own timeout from a cancellation; on 3.10 it waits with `asyncio.wait`, which always
passes a cancellation on.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")

#: The longest one I/O call of an account may take (a Redis round trip): the timeout of
#: the client whose create makes the call, set by the create layer around its calls.
IO_TIMEOUT: contextvars.ContextVar[float] = contextvars.ContextVar(
    "kling_account_io_timeout", default=10.0
)


if sys.version_info >= (3, 11):

    async def within(awaitable: Awaitable[T], timeout: float | None) -> T:
        """Await `awaitable` for at most `timeout` seconds (None: no limit).

        On 3.11+ this is `asyncio.timeout`: one timer handle, no task of its own (a wait
        polls through here once per poll), and it tells its own timeout from an outside
        cancellation.

        Raises:
            asyncio.TimeoutError: the time ran out first (the awaitable is cancelled).
        """
        if timeout is None:
            return await awaitable
        async with asyncio.timeout(max(timeout, 0.0)):
            return await awaitable

else:  # pragma: no cover - Python 3.10

    async def within(awaitable: Awaitable[T], timeout: float | None) -> T:
        """Await `awaitable` for at most `timeout` seconds (None: no limit).

        Raises:
            asyncio.TimeoutError: the time ran out first (the awaitable is cancelled).
        """
        if timeout is None:
            return await awaitable
        inner = asyncio.ensure_future(awaitable)
        try:
            await asyncio.wait((inner,), timeout=max(timeout, 0.0))
        except asyncio.CancelledError:
            inner.cancel()
            await asyncio.wait((inner,))
            raise
        if not inner.done():
            inner.cancel()
            await asyncio.wait((inner,))
        if inner.cancelled():
            raise asyncio.TimeoutError
        return inner.result()  # finished in time, or just as the time ran out
