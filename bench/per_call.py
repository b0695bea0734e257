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
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

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


T = TypeVar("T")


def in_turn(sides: Sequence[T], round_: int) -> Sequence[T]:
    """The sides of a comparison in the order round `round_` runs them: alternating, so
    that neither always runs first (on a warmer or a colder machine)."""
    return sides if round_ % 2 == 0 else sides[::-1]


async def cpu_per_call(
    call: Callable[[], Awaitable[object]], n: int, concurrency: int = 1
) -> float:
    """CPU seconds per call of `n` calls made by `concurrency` callers at once, after a
    warm-up of about `WARMUP` calls (connections made, code paths and caches warm)."""

    async def caller(calls: int) -> None:
        for _ in range(calls):
            await call()

    warmup = -(-WARMUP // concurrency)
    await asyncio.gather(*(caller(warmup) for _ in range(concurrency)))
    each = n // concurrency
    started = time.process_time()
    await asyncio.gather(*(caller(each) for _ in range(concurrency)))
    return (time.process_time() - started) / (each * concurrency)


def raw_session(pool: int) -> aiohttp.ClientSession:
    """The raw side's session: the client's timers and a pool of `pool` connections."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=pool), timeout=TIMEOUT)


class RawCaller:
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
        """POST the body `extend` sends (with a fresh ``external_task_id``, as it does)."""
        body = {
            "video_id": "828006748715380777",
            "prompt": PROMPT,
            "cfg_scale": 0.5,
            "external_task_id": uuid.uuid4().hex,
        }
        async with self.session.post(
            self.base_url + PATH, data=orjson.dumps(body), headers=self.post_headers
        ) as response:
            document = orjson.loads(await response.read())
        if response.status != 200 or document["code"] != 0:
            raise RuntimeError(document)
        data: dict[str, object] = document["data"]
        return data


async def _raw(base_url: str, api_key: str, task_id: str, n: int) -> tuple[float, float]:
    """(CPU per GET, CPU per POST) of a careful hand-written aiohttp caller."""
    async with raw_session(POOL) as session:
        raw = RawCaller(session, base_url, api_key)
        return await cpu_per_call(lambda: raw.get(task_id), n), await cpu_per_call(raw.create, n)


async def _client(base_url: str, api_key: str, task_id: str, n: int) -> tuple[float, float]:
    """(CPU per `get_task`, CPU per `extend`) of kling_async."""
    request = ExtendRequest(video_id="828006748715380777", prompt=PROMPT, cfg_scale=0.5)
    async with KlingClient(api_key=api_key, base_url=base_url) as kling:
        return (
            await cpu_per_call(lambda: kling.get_task(task_id), n),
            await cpu_per_call(lambda: kling.extend(request), n),
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
        for name, run in in_turn(sides, round_):
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
