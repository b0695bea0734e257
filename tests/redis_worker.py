"""One worker process for the multi-process RedisAccount scenarios (not a test module).

    python tests/redis_worker.py CONFIG_JSON

CONFIG: redis, name, base_url, api_key, max_running (or null), lease, items
([external_task_id, video_id] pairs), hold (create only, print, then wait to be killed);
optional: timeout (the client's, default 10), wait (extend_and_wait's, default 60),
attempts (runs of a job failing on Redis, as a job queue's redelivery; default 10),
linger (seconds to keep the account open after the items, default 0).
Warnings (the account's) go to stderr.
Prints one JSON line per item: {"ext", "task_id", "status"} or {"ext", "error"}.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from kling_async import APIConnectionError, ExtendRequest, KlingClient, PollPolicy
from kling_async.redis import RedisAccount
from kling_async.testing import set_testing


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


async def main(config: dict[str, Any]) -> None:
    # As the tests' own process: the simulator delivers no request late, so "no such
    # task" is proof at once (a claim's maybe_since costs a look-up, not a wait).
    set_testing(True)
    account = RedisAccount(
        config["redis"],
        name=config["name"],
        max_running=config["max_running"],
        lease=config["lease"],
    )
    poll = PollPolicy(initial=0.05, factor=1.5, max_interval=0.2)
    async with KlingClient(
        api_key=config["api_key"],
        base_url=config["base_url"],
        poll=poll,
        timeout=config.get("timeout", 10.0),
        account=account,  # type: ignore[call-arg]
    ) as kling:

        async def one(ext: str, video: str) -> None:
            request = ExtendRequest(video, "继续", external_task_id=ext)
            attempts = config.get("attempts", 10)
            for attempt in range(attempts):  # what a job queue's redelivery would do
                try:
                    if config.get("hold"):
                        task = await kling.extend(request)
                    else:
                        task = await kling.extend_and_wait(request, timeout=config.get("wait", 60))
                except APIConnectionError as error:
                    if "Redis" not in str(error) or attempt == attempts - 1:
                        say(ext=ext, error=str(error))
                        return
                    await asyncio.sleep(0.2)
                else:
                    say(ext=ext, task_id=task.task_id, status=task.status.value)
                    return

        await asyncio.gather(*(one(ext, video) for ext, video in config["items"]))
        if config.get("hold"):
            say(held=True)
            await asyncio.Event().wait()  # until killed
        await asyncio.sleep(config.get("linger", 0))  # its account still open
    await account.aclose()


if __name__ == "__main__":
    settings = json.loads(sys.argv[1])
    if settings.get("debug"):
        import logging

        logging.basicConfig(level=logging.INFO, format="%(relativeCreated)d %(message)s")
    asyncio.run(main(settings))
