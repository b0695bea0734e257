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
from typing import Any

from per_call import RawCaller, cpu_per_call, raw_session
from server import PROMPT

from kling_async import ExtendRequest, KlingClient, PollPolicy

GET_CONCURRENCY = 32
CREATE_CONCURRENCY = 64
BATCH_CONCURRENCY = 64
#: The batch's polls: a fixed interval, no jitter, on both sides.
POLL_EVERY = 0.1
POLL = PollPolicy(initial=POLL_EVERY, factor=1.0, max_interval=POLL_EVERY, jitter=0.0)


async def raw_calls(base_url: str, api_key: str, task_id: str, n: int) -> tuple[float, float]:
    """(CPU per GET at 32 at once, CPU per POST at 64 at once), raw."""
    async with raw_session(GET_CONCURRENCY) as session:
        raw = RawCaller(session, base_url, api_key)
        get = await cpu_per_call(lambda: raw.get(task_id), n, GET_CONCURRENCY)
    async with raw_session(CREATE_CONCURRENCY) as session:
        raw = RawCaller(session, base_url, api_key)
        create = await cpu_per_call(raw.create, n, CREATE_CONCURRENCY)
    return get, create


async def client_calls(base_url: str, api_key: str, task_id: str, n: int) -> tuple[float, float]:
    """(CPU per `get_task` at 32 at once, CPU per `extend` at 64 at once)."""
    request = ExtendRequest(video_id="828006748715380777", prompt=PROMPT, cfg_scale=0.5)
    async with KlingClient(
        api_key=api_key, base_url=base_url, max_in_flight=GET_CONCURRENCY
    ) as kling:
        get = await cpu_per_call(lambda: kling.get_task(task_id), n, GET_CONCURRENCY)
    async with KlingClient(
        api_key=api_key, base_url=base_url, max_in_flight=CREATE_CONCURRENCY
    ) as kling:
        create = await cpu_per_call(lambda: kling.extend(request), n, CREATE_CONCURRENCY)
    return get, create


async def raw_batch(base_url: str, api_key: str, items: int) -> tuple[float, float]:
    """(CPU per item, requests per item) of a raw waited batch: POST, then GET every
    `POLL_EVERY` s until the task ends."""
    async with raw_session(BATCH_CONCURRENCY) as session:
        raw = RawCaller(session, base_url, api_key)
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
