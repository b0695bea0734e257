"""A script using `SyncKlingClient`, interrupted by the SIGINT tests (not a test module).

    python tests/sync_worker.py MODE BASE_URL API_KEY

MODE ``wait``: creates one task and waits for it; ``batch``: runs a batch of 6 (the
simulator keeps tasks running). Prints ``{"waiting": [task ids]}`` once a task is seen
running, so the test knows when to interrupt. A Ctrl-C is left uncaught, as in any
script: the process ends by SIGINT, with the interpreter's traceback on stderr.
"""

from __future__ import annotations

import json
import logging
import sys
import threading

from kling_async import ExtendRequest, PollPolicy, SyncKlingClient, Task

POLL = PollPolicy(initial=0.05, factor=1.5, max_interval=0.2)


def main(mode: str, base_url: str, api_key: str) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    seen: set[str] = set()
    announced = threading.Event()

    def running(task: Task) -> None:
        seen.add(task.task_id)
        if not announced.is_set() and len(seen) >= (1 if mode == "wait" else 3):
            announced.set()
            print(json.dumps({"waiting": sorted(seen)}), flush=True)

    with SyncKlingClient(api_key=api_key, base_url=base_url, poll=POLL, timeout=30.0) as kling:
        if mode == "wait":
            task = kling.extend(ExtendRequest("828006748715380777", "slow one"))
            kling.wait_for_task(task, on_update=running)
        else:
            requests = [ExtendRequest("828006748715380777", f"item {n}") for n in range(6)]
            for _ in kling.extend_many(
                requests, concurrency=3, on_update=lambda _, task: running(task)
            ):
                pass
    print("not interrupted", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
