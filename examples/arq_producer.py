"""Enqueue one arq job per video and print each result as it finishes.

    python arq_producer.py videos.jsonl

Each line of the file is ``{"video_id": "...", "prompt": "..."}``. The job id is made
from the line, so enqueueing the same file twice does not extend a video twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from arq import create_pool
from arq.connections import RedisSettings


async def enqueue_all(lines: list[dict[str, str]], redis_url: str) -> list[Any]:
    redis = await create_pool(RedisSettings.from_dsn(redis_url))
    try:
        jobs = []
        for line in lines:
            key = hashlib.sha256(json.dumps(line, sort_keys=True).encode()).hexdigest()[:16]
            job = await redis.enqueue_job(
                "extend_video", line["video_id"], line["prompt"], _job_id=f"extend-{key}"
            )
            if job is not None:  # None: a job with that id is queued or done already
                jobs.append(job)
        results = []
        for job in jobs:
            result = await job.result(timeout=None)
            print(json.dumps(result, ensure_ascii=False))
            results.append(result)
        return results
    finally:
        await redis.aclose()


def main() -> None:
    text = Path(sys.argv[1]).read_text(encoding="utf-8")
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    asyncio.run(enqueue_all(lines, os.environ.get("REDIS_URL", "redis://localhost:6379/0")))


if __name__ == "__main__":
    main()
