"""Where `get_task`'s CPU goes: each layer of the client called on its own, 32 at once.

    python bench/layers.py [ROUNDS]

Beside raw aiohttp (GET + `orjson.loads`), the same GET through `Transport.send`, through
the retry runner, with the answer parsed into a `Task`, through `Tasks.get` and through
`KlingClient.get_task`; CPU per call in this process (the simulator runs in its own),
median over rounds. docs/performance.md has a run's figures.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
from collections.abc import Awaitable, Callable

import per_call
from many_at_once import GET_CONCURRENCY
from per_call import RawCaller, cpu_per_call, raw_session
from server import simulator_process

from kling_async import KlingClient, Task, _protocol
from kling_async._converter import parse_task

CALLS = 4000


async def _layers(base_url: str, api_key: str, task_id: str, turn: int) -> dict[str, float]:
    out: dict[str, float] = {}
    async with raw_session(GET_CONCURRENCY) as session:
        raw = RawCaller(session, base_url, api_key)
        out["raw aiohttp GET + orjson.loads"] = await cpu_per_call(
            lambda: raw.get(task_id), CALLS, GET_CONCURRENCY
        )
    async with KlingClient(
        api_key=api_key, base_url=base_url, max_in_flight=GET_CONCURRENCY
    ) as kling:
        transport = kling._tasks.transport
        path = _protocol.task_path(task_id)

        async def parsed() -> Task:
            data, request_id = await transport.retrying(transport.send, "GET", path)
            return parse_task(data, request_id=request_id)

        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "Transport.send": lambda: transport.send("GET", path),
            "Transport.retrying(send)": lambda: transport.retrying(transport.send, "GET", path),
            "  + parse_task": parsed,
            "Tasks.get": lambda: kling._tasks.get(task_id),
            "KlingClient.get_task": lambda: kling.get_task(task_id),
        }
        # Each round starts at another layer: a drift within a round (the heap, the
        # pool) falls on every layer alike.
        names = list(calls)
        for name in names[turn % len(names) :] + names[: turn % len(names)]:
            out[name] = await cpu_per_call(calls[name], CALLS, GET_CONCURRENCY)
    return out


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 9
    with simulator_process(submit_time=0, processing_time=0) as (base_url, api_key):
        task_id = asyncio.run(per_call._finished_task(base_url, api_key))
        runs = [asyncio.run(_layers(base_url, api_key, task_id, turn)) for turn in range(rounds)]
    for name in runs[0] | runs[-1]:
        print(f"{name:32} {statistics.median(run[name] for run in runs) * 1e6:6.1f} µs")


if __name__ == "__main__":
    main()
