"""Client CPU per call under concurrency, and per item of a waited batch, beside raw aiohttp.

The figures of issue 14's table: `get_task` with 32 callers at once, `extend` with 64,
and `extend_many(wait=True)` at concurrency 64 (create, then polls until the task
ends). The raw side does the same requests with the client's own timers (total and
connect), the same pool size and orjson; for the batch, the same fixed poll interval.
Each round measures both sides back to back in alternating order, in this process only
(the simulator runs in its own), with `time.process_time`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
from per_call import PATH, TIMEOUT, WARMUP
from server import PROMPT

from kling_async import ExtendRequest, KlingClient, PollPolicy

GET_CONCURRENCY = 32
CREATE_CONCURRENCY = 64
BATCH_CONCURRENCY = 64
#: The batch's polls: a fixed interval, no jitter, on both sides.
POLL_EVERY = 0.1
POLL = PollPolicy(initial=POLL_EVERY, factor=1.0, max_interval=POLL_EVERY, jitter=0.0)


async def _cpu(call: Callable[[], Awaitable[object]], n: int, concurrency: int) -> float:
    """CPU seconds per call of `n` calls made by `concurrency` callers at once."""

    async def caller(calls: int) -> None:
        for _ in range(calls):
            await call()

    await asyncio.gather(*(caller(WARMUP // concurrency + 1) for _ in range(concurrency)))
    started = time.process_time()
    await asyncio.gather(*(caller(n // concurrency) for _ in range(concurrency)))
    return (time.process_time() - started) / (n // concurrency * concurrency)


def _body() -> dict[str, object]:
    return {
        "video_id": "828006748715380777",
        "prompt": PROMPT,
        "cfg_scale": 0.5,
        "external_task_id": uuid.uuid4().hex,
    }


class _Raw:
    """A careful hand-written aiohttp caller: the client's timers, pool size and JSON."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, api_key: str) -> None:
        self.session = session
        self.base_url = base_url
        self.headers = {"Authorization": f"Bearer {api_key}", "Accept": "application/json"}
        self.post_headers = {**self.headers, "Content-Type": "application/json"}

    async def get(self, task_id: str) -> dict[str, object]:
        url = f"{self.base_url}{PATH}/{task_id}"
        async with self.session.get(url, headers=self.headers) as response:
            document = orjson.loads(await response.read())
        if response.status != 200 or document["code"] != 0:
            raise RuntimeError(document)
        data: dict[str, object] = document["data"]
        return data

    async def create(self) -> dict[str, object]:
        async with self.session.post(
            self.base_url + PATH, data=orjson.dumps(_body()), headers=self.post_headers
        ) as response:
            document = orjson.loads(await response.read())
        if response.status != 200 or document["code"] != 0:
            raise RuntimeError(document)
        data: dict[str, object] = document["data"]
        return data


def _session(pool: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=pool), timeout=TIMEOUT)


async def raw_calls(base_url: str, api_key: str, task_id: str, n: int) -> tuple[float, float]:
    """(CPU per GET at 32 at once, CPU per POST at 64 at once), raw."""
    async with _session(GET_CONCURRENCY) as session:
        raw = _Raw(session, base_url, api_key)
        get = await _cpu(lambda: raw.get(task_id), n, GET_CONCURRENCY)
    async with _session(CREATE_CONCURRENCY) as session:
        raw = _Raw(session, base_url, api_key)
        create = await _cpu(raw.create, n, CREATE_CONCURRENCY)
    return get, create


async def client_calls(base_url: str, api_key: str, task_id: str, n: int) -> tuple[float, float]:
    """(CPU per `get_task` at 32 at once, CPU per `extend` at 64 at once)."""
    request = ExtendRequest(video_id="828006748715380777", prompt=PROMPT, cfg_scale=0.5)
    async with KlingClient(
        api_key=api_key, base_url=base_url, max_in_flight=GET_CONCURRENCY
    ) as kling:
        get = await _cpu(lambda: kling.get_task(task_id), n, GET_CONCURRENCY)
    async with KlingClient(
        api_key=api_key, base_url=base_url, max_in_flight=CREATE_CONCURRENCY
    ) as kling:
        create = await _cpu(lambda: kling.extend(request), n, CREATE_CONCURRENCY)
    return get, create


async def raw_batch(base_url: str, api_key: str, items: int) -> tuple[float, float]:
    """(CPU per item, requests per item) of a raw waited batch: POST, then GET every
    `POLL_EVERY` s until the task ends."""
    async with _session(BATCH_CONCURRENCY) as session:
        raw = _Raw(session, base_url, api_key)
        pending = iter(range(items))
        sent = 0

        async def worker() -> None:
            nonlocal sent
            for _ in pending:
                task = await raw.create()
                sent += 1
                while True:
                    await asyncio.sleep(POLL_EVERY)
                    task = await raw.get(str(task["task_id"]))
                    sent += 1
                    if task["task_status"] in ("succeed", "failed"):
                        break

        started = time.process_time()
        await asyncio.gather(*(worker() for _ in range(BATCH_CONCURRENCY)))
        return (time.process_time() - started) / items, sent / items


async def client_batch(base_url: str, api_key: str, items: int) -> tuple[float, float]:
    """(CPU per item, requests per item) of `extend_many(wait=True)` at concurrency 64,
    with the raw side's poll interval."""
    requests = (
        ExtendRequest(video_id=f"8280067487153{i:05d}", prompt=PROMPT, cfg_scale=0.5)
        for i in range(items)
    )
    async with KlingClient(
        api_key=api_key, base_url=base_url, max_in_flight=BATCH_CONCURRENCY, poll=POLL
    ) as kling:
        # Counted at the transport (one frame more per request: well under 1 %): the two
        # sides may poll a task a different number of times before it is seen finished.
        transport = kling._tasks.transport
        send = transport.send
        sent = 0

        async def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal sent
            sent += 1
            return await send(*args, **kwargs)

        transport.send = counted  # type: ignore[method-assign]
        started = time.process_time()
        async for result in kling.extend_many(requests, concurrency=BATCH_CONCURRENCY):
            if not result.ok:
                raise RuntimeError(result.error)
        return (time.process_time() - started) / items, sent / items
