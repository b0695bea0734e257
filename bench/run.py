"""Benchmarks: kling_async against raw aiohttp doing the same work, reported as ratios.

Run with ``nox -s bench`` (or ``python bench/run.py``). The simulator runs in a separate
process (``python -m kling_async.testing``) so that its CPU is not ours.

1. Creates per second with ``extend_many(wait=False)``: N items at concurrency 64,
   beside a hand-written aiohttp + semaphore loop sending the same POSTs (same headers,
   same bodies, same timeouts, response read and parsed as JSON). Target: client >= 0.85x raw.
2. Peak RSS of a fresh process running the same batch at 10,000 and at 100,000 items.
   Target: growth <= 10 MB (memory stays flat in the input size).

Options: ``--items N`` (default 20000), ``--rounds R`` (default 5), ``--rss-small``,
``--rss-large`` (defaults 10000 and 100000), ``--skip-rss``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import aiohttp
import orjson

from kling_async import ExtendRequest, KlingClient

CONCURRENCY = 64
PROMPT = "延长动画效果，镜头缓慢推进"


@contextlib.contextmanager
def simulator_process() -> Iterator[tuple[str, str]]:
    """Start the simulator in its own process; yield (base_url, api_key)."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kling_async.testing",
            "--port",
            "0",
            "--submit-time",
            "1",
            "--processing-time",
            "5",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        values = {}
        while len(values) < 3:
            line = process.stdout.readline()
            if not line:
                raise RuntimeError("the simulator did not start")
            key, _, value = line.strip().partition("=")
            values[key] = value
        yield values["KLING_BASE_URL"], values["KLING_API_KEY"]
    finally:
        process.terminate()
        process.wait(10)


def requests(n: int) -> Iterator[ExtendRequest]:
    for i in range(n):
        yield ExtendRequest(video_id=f"8280067487153{i:05d}", prompt=PROMPT, cfg_scale=0.5)


async def raw_aiohttp(base_url: str, api_key: str, n: int) -> float:
    """The baseline: what a careful hand-written loop does for the same creates."""
    semaphore = asyncio.Semaphore(CONCURRENCY)
    headers = {
        "Authorization": f"Bearer {api_key}",
        "Content-Type": "application/json",
        "Accept": "application/json",
    }
    url = base_url + "/v1/videos/video-extend"
    # The same timeouts the client sets (API.md: an explicit total/connect/sock_read):
    # a loop without them is not a fair baseline, it is a bug waiting for a slow answer.
    timeout = aiohttp.ClientTimeout(total=60, connect=30, sock_read=60)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=CONCURRENCY), timeout=timeout
    ) as session:

        async def create(request: ExtendRequest) -> None:
            body = {
                "video_id": request.video_id,
                "prompt": request.prompt,
                "cfg_scale": request.cfg_scale,
                "external_task_id": uuid.uuid4().hex,
            }
            async with (
                semaphore,
                session.post(url, data=orjson.dumps(body), headers=headers) as response,
            ):
                document = orjson.loads(await response.read())
                assert document["code"] == 0, document

        started = time.perf_counter()
        # The same lazy shape as extend_many: at most CONCURRENCY creates pending at once.
        pending: set[asyncio.Task[None]] = set()
        for request in requests(n):
            if len(pending) >= CONCURRENCY:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
            pending.add(asyncio.ensure_future(create(request)))
        await asyncio.gather(*pending)
        return n / (time.perf_counter() - started)


async def with_client(base_url: str, api_key: str, n: int) -> float:
    async with KlingClient(api_key=api_key, base_url=base_url, max_in_flight=CONCURRENCY) as kling:
        started = time.perf_counter()
        count = 0
        async for result in kling.extend_many(requests(n), concurrency=CONCURRENCY, wait=False):
            assert result.ok, result.error
            count += 1
        assert count == n
        return n / (time.perf_counter() - started)


def rss_child(base_url: str, api_key: str, n: int) -> None:
    """In a fresh process: run the batch, print peak RSS in KiB."""
    asyncio.run(with_client(base_url, api_key, n))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def peak_rss(base_url: str, api_key: str, n: int) -> int:
    out = subprocess.run(
        [sys.executable, __file__, "--rss-child", str(n), base_url, api_key],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return int(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rss-small", type=int, default=10_000)
    parser.add_argument("--rss-large", type=int, default=100_000)
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--rss-child", nargs=3, metavar=("N", "BASE_URL", "API_KEY"))
    args = parser.parse_args()
    if args.rss_child:
        n, base_url, api_key = args.rss_child
        rss_child(base_url, api_key, int(n))
        return 0

    report: dict[str, object] = {
        "items": args.items,
        "concurrency": CONCURRENCY,
        "cpus": os.cpu_count(),
    }
    raw_rates: list[float] = []
    client_rates: list[float] = []
    for round_ in range(args.rounds):
        # A fresh simulator for every run, so neither side pays for the tasks the other
        # left in it; the order alternates so neither always runs on a warmer machine.
        order = [("raw", raw_aiohttp), ("client", with_client)]
        for name, run in order if round_ % 2 == 0 else order[::-1]:
            with simulator_process() as (base_url, api_key):
                rate = asyncio.run(run(base_url, api_key, args.items))
            (raw_rates if name == "raw" else client_rates).append(rate)
        print(
            f"round {round_ + 1}: raw {raw_rates[-1]:.0f}/s, kling_async {client_rates[-1]:.0f}/s",
            flush=True,
        )
    paired = statistics.median(c / r for c, r in zip(client_rates, raw_rates, strict=True))
    best = max(client_rates) / max(raw_rates)
    report.update(
        raw_creates_per_s=round(statistics.median(raw_rates)),
        client_creates_per_s=round(statistics.median(client_rates)),
        ratio_median_of_rounds=round(paired, 3),
        ratio_best_to_best=round(best, 3),
        ratio_target=0.85,
    )
    print(
        f"creates/s (median): kling_async {statistics.median(client_rates):.0f} vs raw "
        f"aiohttp {statistics.median(raw_rates):.0f}: {paired:.2f}x median of rounds, "
        f"{best:.2f}x best to best (target >= 0.85x)",
        flush=True,
    )
    if not args.skip_rss:
        with simulator_process() as (base_url, api_key):
            small = peak_rss(base_url, api_key, args.rss_small)
        with simulator_process() as (base_url, api_key):
            large = peak_rss(base_url, api_key, args.rss_large)
        growth_mb = (large - small) / 1024
        report.update(
            rss_small_kib=small,
            rss_large_kib=large,
            rss_growth_mb=round(growth_mb, 1),
            rss_target_mb=10,
        )
        print(
            f"peak RSS: {small / 1024:.1f} MB at {args.rss_small} items, "
            f"{large / 1024:.1f} MB at {args.rss_large}: growth {growth_mb:.1f} MB "
            f"(target <= 10 MB)",
            flush=True,
        )
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
