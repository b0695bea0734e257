"""Benchmarks: kling_async against raw aiohttp doing the same work, reported as ratios.

Run with ``nox -s bench`` (or ``python bench/run.py``). The simulator runs in a separate
process (``python -m kling_async.testing``) so that its CPU is not ours; each comparison
runs both sides in the same run, against the same simulator process, in alternating order.

1. Client CPU per call (`per_call.py`): `get_task` and `extend`, one call at a time,
   beside raw aiohttp + orjson, measured with `time.process_time` in this process;
   and many at once (`many_at_once.py`): 32 `get_task`, 64 creates, and a waited
   batch at concurrency 64 per item. Target: <= 1.10x raw (the batch: <= 1.15x).
2. Creates per second with ``extend_many(wait=False)``: N items at concurrency 64,
   beside a hand-written aiohttp + semaphore loop sending the same POSTs (same headers,
   same bodies, same timeouts, response read and parsed as JSON). Target: >= 0.90x raw.
3. Import time (`imports.py`): ``import kling_async`` vs ``import aiohttp``, fresh
   interpreters, median of many. Target: <= 1.10x.
4. Peak RSS of a fresh process running the same batch at 10,000 and at 100,000 items
   (``--rss-large 1000000`` for the issue's 1M). Target: growth <= 10 MB.
5. Sharing an account (`accounts.py`): a 4-slot account driven by one process (private,
   given and learned `InMemoryAccount`) and by four processes through a `RedisAccount`
   (given and learned): wall time against the ideal (target <= 1.3x) and 1303 answers
   per task (<= 0.1 given, <= 0.5 learned); and a RedisAccount's cost per create
   (target < 1 ms). Its own table, printed after the others.
6. What exactly-once costs (`guarantees.py`): requests and client CPU per `extend` with
   the client's own id and with a caller-given one (looked up first: target <= 1 GET).
7. The command line's start-up (`imports.py`): ``kling-async --help`` and a usage error,
   whole processes (interpreter start-up included), beside a process that imports
   aiohttp. Target: ``--help`` <= 0.15 s on a quiet machine (click alone is loaded).

Options: ``--items N`` (default 20000), ``--rounds R`` (default 5), ``--calls C`` (per
call, default 2000), ``--import-reps K`` (default 40), ``--rss-small``, ``--rss-large``
(defaults 10000 and 100000),
``--only {cpu,throughput,import,cli,rss,accounts,guarantees,otel}``
(repeatable).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import uuid

import accounts
import aiohttp
import guarantees
import imports
import many_at_once
import orjson
import per_call
from server import CONCURRENCY, requests, simulator_process

from kling_async import ExtendRequest, KlingClient


async def raw_aiohttp(base_url: str, api_key: str, n: int) -> float:
    """The baseline: what a careful hand-written loop does for the same creates."""
    semaphore = asyncio.Semaphore(CONCURRENCY)
    headers = {
        "Authorization": f"Bearer {api_key}",
        "Content-Type": "application/json",
        "Accept": "application/json",
    }
    url = base_url + "/v1/videos/video-extend"
    # The same timers the client arms (a total, and a connect timer for new sockets): a
    # loop without them would be a bug waiting for a slow answer, one with more would
    # do more work than the client.
    timeout = aiohttp.ClientTimeout(total=60, sock_connect=30)
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


Row = tuple[str, str, str, float, str, bool]


def _throughput(args: argparse.Namespace, report: dict[str, object]) -> Row:
    raw_rates: list[float] = []
    client_rates: list[float] = []
    for round_ in range(args.rounds):
        # A fresh simulator for every run, so neither side pays for the tasks the other
        # left in it.
        order = [("raw", raw_aiohttp), ("client", with_client)]
        for name, run in per_call.in_turn(order, round_):
            with simulator_process() as (base_url, api_key):
                rate = asyncio.run(run(base_url, api_key, args.items))
            (raw_rates if name == "raw" else client_rates).append(rate)
        print(
            f"creates/s, round {round_ + 1}: raw {raw_rates[-1]:.0f}/s, "
            f"kling_async {client_rates[-1]:.0f}/s",
            flush=True,
        )
    paired = statistics.median(c / r for c, r in zip(client_rates, raw_rates, strict=True))
    report.update(
        raw_creates_per_s=round(statistics.median(raw_rates)),
        client_creates_per_s=round(statistics.median(client_rates)),
        creates_ratio_median_of_rounds=round(paired, 3),
        creates_ratio_best_to_best=round(max(client_rates) / max(raw_rates), 3),
    )
    return (
        f"extend_many(wait=False), {args.items} items",
        f"{statistics.median(client_rates):.0f}/s",
        f"{statistics.median(raw_rates):.0f}/s",
        paired,
        ">= 0.90x",
        paired >= 0.90,
    )


def _cpu(args: argparse.Namespace, report: dict[str, object]) -> list[Row]:
    with simulator_process(submit_time=0, processing_time=0) as (base_url, api_key):
        out = per_call.measure(base_url, api_key, calls=args.calls, rounds=args.rounds)
    rows: list[Row] = []
    for kind, label in (("get", "CPU per get_task"), ("create", "CPU per create (extend)")):
        client, raw = out[f"client_{kind}"], out[f"raw_{kind}"]
        ratio = per_call.paired_ratio(client, raw)
        report.update(
            {
                f"client_cpu_per_{kind}_us": round(statistics.median(client) * 1e6, 1),
                f"raw_cpu_per_{kind}_us": round(statistics.median(raw) * 1e6, 1),
                f"cpu_{kind}_ratio": round(ratio, 3),
            }
        )
        rows.append(
            (
                label,
                f"{statistics.median(client) * 1e6:.0f} µs",
                f"{statistics.median(raw) * 1e6:.0f} µs",
                ratio,
                "<= 1.10x",
                ratio <= 1.10,
            )
        )
    rows += _cpu_concurrent(args, report)
    return rows


def _cpu_concurrent(args: argparse.Namespace, report: dict[str, object]) -> list[Row]:
    """Issue 14's figures: 32 get_task and 64 creates at once, and a waited batch."""
    out: dict[str, list[float]] = {
        f"{side}_{kind}": []
        for side in ("raw", "client")
        for kind in ("get", "create", "batch", "batch_requests")
    }
    with simulator_process(submit_time=0, processing_time=0) as (base_url, api_key):
        task_id = asyncio.run(per_call._finished_task(base_url, api_key))
        for round_ in range(args.rounds):
            sides = [("raw", many_at_once.raw_calls), ("client", many_at_once.client_calls)]
            for name, run in per_call.in_turn(sides, round_):
                get, create = asyncio.run(run(base_url, api_key, task_id, args.calls))
                out[f"{name}_get"].append(get)
                out[f"{name}_create"].append(create)
            print(
                f"many at once, round {round_ + 1}: get_task x32 "
                f"{out['client_get'][-1] * 1e6:.0f} vs {out['raw_get'][-1] * 1e6:.0f} µs; "
                f"create x64 {out['client_create'][-1] * 1e6:.0f} vs "
                f"{out['raw_create'][-1] * 1e6:.0f} µs",
                flush=True,
            )
    items = max(64, args.calls // 4)
    for round_ in range(args.rounds):
        sides = [("raw", many_at_once.raw_batch), ("client", many_at_once.client_batch)]
        for name, batch in per_call.in_turn(sides, round_):
            # A fresh simulator per side: neither pays for the other's tasks.
            with simulator_process(submit_time=0.1, processing_time=0.3) as (base, key):
                cpu, sent = asyncio.run(batch(base, key, items))
            out[f"{name}_batch"].append(cpu)
            out[f"{name}_batch_requests"].append(sent)
        print(
            f"waited batch, round {round_ + 1}: per item "
            f"{out['client_batch'][-1] * 1e6:.0f} µs ({out['client_batch_requests'][-1]:.2f}"
            f" requests) vs raw {out['raw_batch'][-1] * 1e6:.0f} µs "
            f"({out['raw_batch_requests'][-1]:.2f} requests)",
            flush=True,
        )
    # Per request too: the two sides' polls see a task finished after as many polls as
    # the timing gives, not always the same number.
    for side in ("raw", "client"):
        out[f"{side}_batch_per_request"] = [
            cpu / sent
            for cpu, sent in zip(out[f"{side}_batch"], out[f"{side}_batch_requests"], strict=True)
        ]
    rows: list[Row] = []
    for kind, label, target in (
        ("get", "CPU per get_task, 32 at once", 1.10),
        ("create", "CPU per create, 64 at once", 1.10),
        ("batch", "CPU per item, waited batch (64)", 1.15),
        ("batch_per_request", "  the same, per request", 1.15),
    ):
        client, raw = out[f"client_{kind}"], out[f"raw_{kind}"]
        ratio = per_call.paired_ratio(client, raw)
        report[f"cpu_{kind}_many_ratio"] = round(ratio, 3)
        report[f"client_cpu_{kind}_many_us"] = round(statistics.median(client) * 1e6, 1)
        report[f"raw_cpu_{kind}_many_us"] = round(statistics.median(raw) * 1e6, 1)
        rows.append(
            (
                label,
                f"{statistics.median(client) * 1e6:.0f} µs",
                f"{statistics.median(raw) * 1e6:.0f} µs",
                ratio,
                f"<= {target:.2f}x",
                ratio <= target,
            )
        )
    report["batch_requests_per_item"] = {
        side: round(statistics.median(out[f"{side}_batch_requests"]), 2)
        for side in ("raw", "client")
    }
    return rows


def _imports(args: argparse.Namespace, report: dict[str, object]) -> list[Row]:
    times = imports.measure(args.import_reps)
    theirs = imports.median(times["aiohttp"])
    package, client = imports.median(times["kling_async"]), imports.median(times["KlingClient"])
    report.update(
        import_kling_async_ms=round(package * 1e3, 1),
        import_client_ms=round(client * 1e3, 1),
        import_aiohttp_ms=round(theirs * 1e3, 1),
        import_ratio=round(package / theirs, 3),
        import_client_ratio=round(client / theirs, 3),
    )
    return [
        (
            f"import kling_async (median of {args.import_reps})",
            f"{package * 1e3:.1f} ms",
            f"{theirs * 1e3:.1f} ms",
            package / theirs,
            "<= 1.10x",
            package / theirs <= 1.10,
        ),
        (
            "from kling_async import KlingClient",
            f"{client * 1e3:.1f} ms",
            f"{theirs * 1e3:.1f} ms",
            client / theirs,
            "<= 1.10x",
            client / theirs <= 1.10,
        ),
    ]


def _cli(args: argparse.Namespace, report: dict[str, object]) -> list[Row]:
    times = imports.measure_cli(args.import_reps)
    medians = {name: imports.median(values) for name, values in times.items()}
    aiohttp = medians["python -c 'import aiohttp'"]
    report.update(
        cli_help_ms=round(medians["kling-async --help"] * 1e3, 1),
        cli_usage_error_ms=round(medians["kling-async extend (usage error)"] * 1e3, 1),
        cli_import_aiohttp_process_ms=round(aiohttp * 1e3, 1),
        cli_help_target_ms=imports.CLI_HELP_TARGET * 1e3,
    )
    return [
        (
            f"{name} (process, median of {args.import_reps})",
            f"{medians[name] * 1e3:.0f} ms",
            f"{aiohttp * 1e3:.0f} ms",
            medians[name] / aiohttp,
            f"<= {imports.CLI_HELP_TARGET * 1e3:.0f} ms",
            medians[name] <= imports.CLI_HELP_TARGET,
        )
        for name in ("kling-async --help", "kling-async extend (usage error)")
    ]


def _rss(args: argparse.Namespace, report: dict[str, object]) -> float:
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
    return growth_mb


def _table(rows: list[Row], rss: tuple[int, int, float] | None) -> str:
    header = ("measure", "kling_async", "raw aiohttp", "ratio", "target", "")
    lines = [
        (name, ours, theirs, f"{ratio:.2f}x", target, "ok" if ok else "MISS")
        for name, ours, theirs, ratio, target, ok in rows
    ]
    if rss is not None:
        small, large, growth = rss
        lines.append(
            (
                f"peak RSS growth, {small} -> {large} items",
                f"{growth:+.1f} MB",
                "",
                "",
                "<= 10 MB",
                "ok" if growth <= 10 else "MISS",
            )
        )
    widths = [max(len(str(line[i])) for line in [header, *lines]) for i in range(6)]
    rule = "  ".join("-" * w for w in widths)
    out = [
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in [header, *lines]
    ]
    return "\n".join([out[0], rule, *out[1:]])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2_000)
    parser.add_argument("--import-reps", type=int, default=40)
    parser.add_argument("--rss-small", type=int, default=10_000)
    parser.add_argument("--rss-large", type=int, default=100_000)
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument(
        "--only",
        action="append",
        choices=["cpu", "throughput", "import", "cli", "rss", "accounts", "guarantees", "otel"],
        default=None,
    )
    parser.add_argument("--rss-child", nargs=3, metavar=("N", "BASE_URL", "API_KEY"))
    args = parser.parse_args()
    if args.rss_child:
        n, base_url, api_key = args.rss_child
        rss_child(base_url, api_key, int(n))
        return 0
    only = set(
        args.only or ["cpu", "throughput", "import", "cli", "rss", "accounts", "guarantees", "otel"]
    )
    if args.skip_rss:
        only.discard("rss")

    report: dict[str, object] = {
        "items": args.items,
        "rounds": args.rounds,
        "calls": args.calls,
        "concurrency": CONCURRENCY,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    rows: list[Row] = []
    if "cpu" in only:
        rows += _cpu(args, report)
    if "throughput" in only:
        rows.append(_throughput(args, report))
    if "import" in only:
        rows += _imports(args, report)
    if "cli" in only:
        rows += _cli(args, report)
    rss = None
    if "rss" in only:
        rss = (args.rss_small, args.rss_large, _rss(args, report))
    if "otel" in only:
        import telemetry

        report["otel"] = telemetry.run(rounds=args.rounds, calls=args.calls)
    account_rows: list[accounts.Row] = []
    if "accounts" in only:
        account_rows, report["accounts"] = accounts.run(rounds=min(args.rounds, 3))
    print(json.dumps(report, indent=2))
    if rows or rss is not None:
        print()
        print(_table(rows, rss))
    if account_rows:
        print()
        print(accounts.table(account_rows))
    if "guarantees" in only:
        print()
        print("\n".join(guarantees.run(rounds=min(args.rounds, 3))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
