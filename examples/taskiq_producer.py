"""Enqueue one Taskiq job per video and print each result as it finishes.

    python taskiq_producer.py videos.jsonl

Each line of the file is ``{"video_id": "...", "prompt": "..."}``. The job's task id is
made from the line, so enqueueing the same file twice does not extend a video twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from taskiq_worker import broker, extend_video


async def enqueue_all(lines: list[dict[str, str]], *, timeout: float = 3600) -> list[Any]:
    await broker.startup()
    try:
        jobs = []
        for line in lines:
            key = hashlib.sha256(json.dumps(line, sort_keys=True).encode()).hexdigest()[:16]
            job = (
                await extend_video.kicker()
                .with_task_id(f"extend-{key}")
                .kiq(line["video_id"], line["prompt"])
            )
            jobs.append(job)
        results = []
        for job in jobs:
            result = await job.wait_result(timeout=timeout)
            value = result.return_value if not result.is_err else {"error": str(result.error)}
            print(json.dumps(value, ensure_ascii=False))
            results.append(value)
        return results
    finally:
        await broker.shutdown()


def main() -> None:
    text = Path(sys.argv[1]).read_text(encoding="utf-8")
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    asyncio.run(enqueue_all(lines))


if __name__ == "__main__":
    main()
