"""One batch run in a process of its own, for the journal-owner tests (not a test module).

    python tests/journal_worker.py CONFIG_JSON

CONFIG: base_url, api_key, journal, items (how many of `batch_requests`), concurrency,
wait. Prints one JSON line per result ({"index", "task_id"} or {"index", "error"}), then
{"done": true}; a batch that raises prints {"raised", "message"} and exits with 3.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from kling_async import ExtendRequest, KlingClient, KlingError, PollPolicy

#: What a raised batch exits with (any other failure is Python's own 1).
RAISED = 3


def batch_requests(n: int) -> list[ExtendRequest]:
    """The input every run of these tests uses (the journal checks it is the same)."""
    return [ExtendRequest(video_id=f"video-{i}", prompt=f"extend {i}") for i in range(n)]


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


async def main(config: dict[str, Any]) -> int:
    poll = PollPolicy(initial=0.05, factor=1.5, max_interval=0.2)
    async with KlingClient(
        api_key=config["api_key"], base_url=config["base_url"], poll=poll, timeout=10.0
    ) as kling:
        try:
            async for result in kling.extend_many(
                batch_requests(config["items"]),
                journal=config["journal"],
                concurrency=config["concurrency"],
                wait=config["wait"],
            ):
                if result.error is not None:
                    say(index=result.index, error=str(result.error))
                else:
                    assert result.task is not None
                    say(index=result.index, task_id=result.task.task_id)
        except KlingError as error:
            say(raised=type(error).__name__, message=str(error))
            return RAISED
    say(done=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(json.loads(sys.argv[1]))))
