"""The simulator the benchmarks talk to, in a process of its own so its CPU is not ours."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator

from kling_async import ExtendRequest

#: Requests in flight at once, for both sides of every concurrent comparison.
CONCURRENCY = 64
PROMPT = "延长动画效果，镜头缓慢推进"


@contextlib.contextmanager
def simulator_process(
    *, submit_time: float = 1, processing_time: float = 5
) -> Iterator[tuple[str, str]]:
    """Start ``python -m kling_async.testing`` on a free port; yield (base_url, api_key)."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kling_async.testing",
            "--port",
            "0",
            "--submit-time",
            str(submit_time),
            "--processing-time",
            str(processing_time),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        values: dict[str, str] = {}
        while len(values) < 3:
            line = process.stdout.readline()
            if not line:
                raise RuntimeError("the simulator did not start")
            for pair in line.strip().removeprefix("export ").split():
                key, _, value = pair.partition("=")
                values[key] = value
        yield values["KLING_BASE_URL"], values["KLING_API_KEY"]
    finally:
        process.terminate()
        process.wait(10)


def requests(n: int) -> Iterator[ExtendRequest]:
    """`n` distinct create requests, as a user's batch would send them."""
    for i in range(n):
        yield ExtendRequest(video_id=f"8280067487153{i:05d}", prompt=PROMPT, cfg_scale=0.5)
