"""Client CPU per call: `get_task` and `extend` beside raw aiohttp + orjson, one at a time.

Both sides talk to the same simulator process, one call after another over one kept-alive
connection. `time.process_time()` counts the CPU of this process only (all its threads),
so the simulator's work, in its own process, is not counted; neither is time spent
waiting for its answers. Each round measures both sides, in alternating order, after a
warm-up of `WARMUP` calls each (connection made, code paths and caches warm).
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
from server import PROMPT

from kling_async import ExtendRequest, KlingClient

WARMUP = 200
#: The timers the client arms (`Transport`: one total, and a connect timer for new
#: sockets only): the baseline does the same work, no more (a `sock_read` timer the
#: client does not arm would cost the baseline ~7%) and no less.
TIMEOUT = aiohttp.ClientTimeout(total=60, sock_connect=30)
#: The client's pool: `max_in_flight` (8) connections.
POOL = 8
PATH = "/v1/videos/video-extend"


async def _cpu_per_call(call: Callable[[], Awaitable[object]], n: int) -> float:
    for _ in range(WARMUP):
        await call()
    started = time.process_time()
    for _ in range(n):
        await call()
    return (time.process_time() - started) / n


async def _raw(base_url: str, api_key: str, task_id: str, n: int) -> tuple[float, float]:
    """(CPU per GET, CPU per POST) of a careful hand-written aiohttp caller."""
    headers = {"Authorization": f"Bearer {api_key}", "Accept": "application/json"}
    post_headers = {**headers, "Content-Type": "application/json"}
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=POOL), timeout=TIMEOUT
    ) as session:

        async def get() -> object:
            async with session.get(f"{base_url}{PATH}/{task_id}", headers=headers) as response:
                document = orjson.loads(await response.read())
            if response.status != 200 or document["code"] != 0:
                raise RuntimeError(document)
            return document["data"]

        async def create() -> object:
            body = {
                "video_id": "828006748715380777",
                "prompt": PROMPT,
                "cfg_scale": 0.5,
                "external_task_id": uuid.uuid4().hex,
            }
            async with session.post(
                base_url + PATH, data=orjson.dumps(body), headers=post_headers
            ) as response:
                document = orjson.loads(await response.read())
            if response.status != 200 or document["code"] != 0:
                raise RuntimeError(document)
            return document["data"]

        return await _cpu_per_call(get, n), await _cpu_per_call(create, n)


async def _client(base_url: str, api_key: str, task_id: str, n: int) -> tuple[float, float]:
    """(CPU per `get_task`, CPU per `extend`) of kling_async."""
    request = ExtendRequest(video_id="828006748715380777", prompt=PROMPT, cfg_scale=0.5)
    async with KlingClient(api_key=api_key, base_url=base_url) as kling:
        return (
            await _cpu_per_call(lambda: kling.get_task(task_id), n),
            await _cpu_per_call(lambda: kling.extend(request), n),
        )


async def _finished_task(base_url: str, api_key: str) -> str:
    async with KlingClient(api_key=api_key, base_url=base_url) as kling:
        task = await kling.extend_video("828006748715380777", PROMPT)
        return (await kling.wait_for_task(task, timeout=30)).task_id


def measure(base_url: str, api_key: str, *, calls: int, rounds: int) -> dict[str, list[float]]:
    """Per-round CPU seconds per call: ``{"raw_get", "client_get", "raw_create", ...}``."""
    # get_task reads a finished task: the full shape, videos included, is parsed.
    task_id = asyncio.run(_finished_task(base_url, api_key))
    out: dict[str, list[float]] = {
        key: [] for key in ("raw_get", "client_get", "raw_create", "client_create")
    }
    for round_ in range(rounds):
        sides = [("raw", _raw), ("client", _client)]
        for name, run in sides if round_ % 2 == 0 else sides[::-1]:
            get, create = asyncio.run(run(base_url, api_key, task_id, calls))
            out[f"{name}_get"].append(get)
            out[f"{name}_create"].append(create)
        print(
            f"per call, round {round_ + 1}: get_task {out['client_get'][-1] * 1e6:.0f} µs vs "
            f"raw {out['raw_get'][-1] * 1e6:.0f} µs; create {out['client_create'][-1] * 1e6:.0f}"
            f" µs vs raw {out['raw_create'][-1] * 1e6:.0f} µs",
            flush=True,
        )
    return out


def paired_ratio(client: list[float], raw: list[float]) -> float:
    """The median over rounds of client / raw (each round's pair ran back to back)."""
    return statistics.median(c / r for c, r in zip(client, raw, strict=True))
