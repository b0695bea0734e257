"""Sharing an account: wall time against the ideal, 1303 answers per task, Redis cost.

Run by ``nox -s bench`` (``bench/run.py --only accounts``), or alone::

    python bench/accounts.py [--rounds R] [--tasks N] [--creates C]

Every scenario drives a 4-slot simulator account (``Simulator(running_limit=4,
processing_time=0.8, submit_time=0)``) served by a process of its own (this file with
``--simulator``), so its CPU does not compete with the client's; a fresh one per run, and
its counters (tasks created, 1303 answers, duplicates) are read back at the end.

1. One process, 60 tasks through ``extend_many`` (default concurrency) with (a) no
   ``account=`` (the batch's private account), (b) ``InMemoryAccount(max_running=4)``,
   (c) ``InMemoryAccount()`` (learned).
2. Four processes (this file with ``--worker``), 15 tasks each through ``extend_many``,
   sharing one ``RedisAccount`` (given 4, and learned) on a real ``redis-server`` on
   loopback. Each worker connects first and says so; the clock starts when all are told
   to go and stops when the last one is done.
3. What a ``RedisAccount`` costs per create (acquire + created + finished), from
   ``bench/redis_account.py``.

The ideal wall time is tasks x 0.8 s / 4 slots = 12 s. The clients poll with
``PollPolicy(initial=0.1, factor=1.5, max_interval=0.3)`` (``--max-interval`` to change):
a poll policy suited to 0.8 s tasks, as a user would choose for them; the default one
(first look after 2 s) would measure the poll policy, not the account. Targets: wall time
within 1.3x of ideal; 1303 answers per task at most 0.1 with the limit given, 0.5 learned;
under 1 ms per create for the RedisAccount.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import redis_account
from server import requests

from kling_async import InMemoryAccount, KlingClient, PollPolicy
from kling_async.testing import Simulator

SLOTS = 4
DURATION = 0.8
PROCESSES = 4
HERE = os.path.dirname(os.path.abspath(__file__))


def poll_policy(max_interval: float) -> PollPolicy:
    return PollPolicy(initial=0.1, factor=1.5, max_interval=max_interval)


# -- the simulator, in a process of its own ------------------------------------------------


async def _serve_simulator() -> None:
    async with Simulator(running_limit=SLOTS, processing_time=DURATION, submit_time=0) as sim:
        print(json.dumps({"base_url": sim.base_url, "api_key": sim.api_key}), flush=True)
        # Serve until the parent closes stdin, then report the counters.
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        print(json.dumps(dataclasses.asdict(sim.counters)), flush=True)


@contextlib.contextmanager
def simulator() -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Yield (base_url, api_key, counters); `counters` is filled in on the way out."""
    process = subprocess.Popen(
        [sys.executable, __file__, "--simulator"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    counters: dict[str, Any] = {}
    try:
        started = json.loads(process.stdout.readline())
        yield started["base_url"], started["api_key"], counters
        process.stdin.close()
        counters.update(json.loads(process.stdout.readline()))
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# -- one process ---------------------------------------------------------------------------


async def one_process(
    base_url: str, api_key: str, account: InMemoryAccount | None, tasks: int, poll: PollPolicy
) -> float:
    options: dict[str, Any] = {} if account is None else {"account": account}
    async with KlingClient(api_key=api_key, base_url=base_url, poll=poll, **options) as kling:
        started = time.perf_counter()
        async for result in kling.extend_many(requests(tasks)):
            assert result.ok, result.error
        return time.perf_counter() - started


# -- many processes ------------------------------------------------------------------------


async def _work(config: dict[str, Any]) -> None:
    from kling_async.redis import RedisAccount

    account = RedisAccount(config["redis"], name=config["name"], max_running=config["max"])
    poll = poll_policy(config["max_interval"])
    async with KlingClient(
        api_key=config["api_key"], base_url=config["base_url"], poll=poll, account=account
    ) as kling:
        warm_up = f"warm-up-{uuid.uuid4().hex}"
        await account.claim(warm_up)  # connect and subscribe before the clock starts
        await account.settle(warm_up, None)
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        first = config["worker"] * config["tasks"]
        batch = list(requests(first + config["tasks"]))[first:]
        ok = 0
        async for result in kling.extend_many(batch):
            ok += result.ok
        print(json.dumps({"ok": ok, "limit": account.limit}), flush=True)
    await account.aclose()


def many_processes(
    url: str, base_url: str, api_key: str, max_running: int | None, tasks: int, interval: float
) -> tuple[float, list[dict[str, Any]]]:
    name = f"bench-{uuid.uuid4().hex[:8]}"
    # The benchmark's redis-server has just started: a name on it would wait out the
    # quarantine that follows a restart (nothing to put back here; it is not timed).
    import redis as redis_py

    seeder = redis_py.Redis.from_url(url)
    try:
        seeder.set(f"kling:{{{name}}}:epoch", "bench")
    finally:
        seeder.close()
    workers = []
    for worker in range(PROCESSES):
        config = {
            "redis": url,
            "name": name,
            "max": max_running,
            "base_url": base_url,
            "api_key": api_key,
            "worker": worker,
            "tasks": tasks,
            "max_interval": interval,
        }
        workers.append(
            subprocess.Popen(
                [sys.executable, __file__, "--worker", json.dumps(config)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    try:
        for process in workers:
            assert process.stdout is not None
            assert process.stdout.readline().strip() == "ready"
        started = time.perf_counter()
        for process in workers:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        outcomes = []
        for process in workers:
            assert process.stdout is not None
            outcomes.append(json.loads(process.stdout.readline()))
        wall = time.perf_counter() - started
        for process in workers:
            assert process.wait(30) == 0
        return wall, outcomes
    finally:
        for process in workers:
            if process.poll() is None:
                process.kill()
                process.wait()


# -- the report ----------------------------------------------------------------------------

Row = tuple[str, str, str, str, bool]


def _scenario(
    label: str, total: int, walls: list[float], refused: list[int], target_1303: float
) -> tuple[Row, dict[str, Any]]:
    ideal = total * DURATION / SLOTS
    wall = statistics.median(walls)
    per_task = statistics.median(refused) / total
    ok = wall / ideal <= 1.3 and per_task <= target_1303
    figures = {
        "tasks": total,
        "ideal_s": ideal,
        "wall_s": [round(w, 2) for w in walls],
        "wall_over_ideal": round(wall / ideal, 3),
        "answers_1303": refused,
        "answers_1303_per_task": round(per_task, 3),
        "target_1303_per_task": target_1303,
    }
    row = (
        label,
        f"{wall:.1f} s = {wall / ideal:.2f}x ideal ({ideal:g} s)",
        f"{per_task:.2f} (<= {target_1303:g})",
        "<= 1.3x",
        ok,
    )
    return row, figures


def _check(counters: dict[str, Any], total: int) -> int:
    assert counters["tasks_created"] == total, counters
    assert max(counters["creates_by_external_id"].values()) == 1, "a task created twice"
    refused: int = counters["rejected_1303"]
    return refused


def run(
    *, rounds: int = 3, tasks: int = 60, creates: int = 1000, max_interval: float = 0.3
) -> tuple[list[Row], dict[str, Any]]:
    """Every scenario, `rounds` times; the rows of the table and the JSON figures."""
    poll = poll_policy(max_interval)
    rows: list[Row] = []
    report: dict[str, Any] = {
        "poll": {"initial": 0.1, "factor": 1.5, "max_interval": max_interval},
        "slots": SLOTS,
        "task_seconds": DURATION,
    }
    given = functools.partial(InMemoryAccount, max_running=SLOTS)
    single: list[tuple[str, str, Any, float]] = [
        ("private", "1 process, no account= (private)", lambda: None, 0.5),
        ("in_memory_given", "1 process, InMemoryAccount(4)", given, 0.1),
        ("in_memory_learned", "1 process, InMemoryAccount()", InMemoryAccount, 0.5),
    ]
    for key, label, make, target in single:
        walls, refused = [], []
        for _ in range(rounds):
            with simulator() as (base_url, api_key, counters):
                walls.append(asyncio.run(one_process(base_url, api_key, make(), tasks, poll)))
            refused.append(_check(counters, tasks))
            print(f"{label}: {walls[-1]:.1f} s, {refused[-1]} answers 1303", flush=True)
        row, report[key] = _scenario(label, tasks, walls, refused, target)
        rows.append(row)

    share = tasks // PROCESSES
    with redis_account.redis_server() as url:
        for key, max_running, target in (
            ("redis_given", SLOTS, 0.1),
            ("redis_learned", None, 0.5),
        ):
            label = f"{PROCESSES} processes, RedisAccount({max_running or 'learned'})"
            walls, refused = [], []
            for _ in range(rounds):
                with simulator() as (base_url, api_key, counters):
                    wall, outcomes = many_processes(
                        url, base_url, api_key, max_running, share, max_interval
                    )
                assert sum(o["ok"] for o in outcomes) == share * PROCESSES, outcomes
                walls.append(wall)
                refused.append(_check(counters, share * PROCESSES))
                limits = [o["limit"] for o in outcomes]
                print(
                    f"{label}: {wall:.1f} s, {refused[-1]} answers 1303, limits seen {limits}",
                    flush=True,
                )
            row, report[key] = _scenario(label, share * PROCESSES, walls, refused, target)
            rows.append(row)

        costs = {}
        for concurrency in (1, 64):
            runs = [
                asyncio.run(redis_account.measure(url, creates, concurrency)) for _ in range(rounds)
            ]
            costs[concurrency] = statistics.median(ms for ms, _ in runs)
            trips = statistics.median(trips for _, trips in runs)
            print(
                f"RedisAccount per create, {concurrency} caller(s): {costs[concurrency]:.3f} ms,"
                f" {trips:.2f} Redis round trips"
            )
    report["redis_ms_per_create"] = {
        "one_after_another": round(costs[1], 3),
        "64_concurrent": round(costs[64], 3),
        "creates_per_round": creates,
    }
    for concurrency, label in ((1, "one after another"), (64, "64 callers")):
        rows.append(
            (
                f"RedisAccount cost per create, {label}",
                f"{costs[concurrency]:.3f} ms",
                "",
                "< 1 ms",
                costs[concurrency] < 1.0,
            )
        )
    return rows, report


def table(rows: list[Row]) -> str:
    header = ("scenario (4-slot account, 0.8 s tasks)", "wall time", "1303 per task", "target", "")
    lines = [(a, b, c, d, "ok" if ok else "MISS") for a, b, c, d, ok in rows]
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(5)]
    out = [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in [header, *lines]
    ]
    return "\n".join([out[0], "  ".join("-" * w for w in widths), *out[1:]])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=60)
    parser.add_argument("--creates", type=int, default=1000)
    parser.add_argument("--max-interval", type=float, default=0.3)
    parser.add_argument("--simulator", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.simulator:
        asyncio.run(_serve_simulator())
        return 0
    if args.worker:
        asyncio.run(_work(json.loads(args.worker)))
        return 0
    rows, report = run(
        rounds=args.rounds, tasks=args.tasks, creates=args.creates, max_interval=args.max_interval
    )
    print(json.dumps(report, indent=2))
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
