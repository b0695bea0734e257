"""A plain aiohttp endpoint that records the callbacks the simulator sends (for tests)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

from aiohttp import web


class Receiver:
    """Records each callback's headers and body; answers with `status`."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.got = asyncio.Event()
        self.status = 200

    @property
    def statuses(self) -> list[str]:
        """The ``task_status`` of each callback, in the order they came."""
        return [json.loads(body)["task_status"] for _, body in self.received]

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append((dict(request.headers), await request.read()))
        self.got.set()
        return web.Response(status=self.status)

    async def wait_for(self, count: int) -> list[str]:
        """Wait (at most 5 s) until `count` callbacks came; their statuses."""

        async def wait() -> None:
            while len(self.received) < count:
                self.got.clear()
                await self.got.wait()

        await asyncio.wait_for(wait(), 5)
        return self.statuses


@contextlib.asynccontextmanager
async def serve_receiver() -> AsyncIterator[tuple[Receiver, str]]:
    """A `Receiver` served on 127.0.0.1, and its URL."""
    handler = Receiver()
    app = web.Application()
    app.router.add_post("/cb", handler.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield handler, f"http://127.0.0.1:{runner.addresses[0][1]}/cb"
    finally:
        await runner.cleanup()
