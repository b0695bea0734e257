"""The simulator's result files: real, tiny, playable MP4s, one per video."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import aiohttp
import pytest

from kling_async import KlingClient
from kling_async.testing import Simulator
from kling_async.testing._mp4 import mp4_video


def boxes(data: bytes) -> list[tuple[bytes, int]]:
    """The top-level boxes as ``(type, size)``, read independently of the client."""
    found, offset = [], 0
    while offset < len(data):
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        found.append((kind, size))
        offset += size
    assert offset == len(data)
    return found


def movie_seconds(data: bytes) -> float:
    at = data.index(b"mvhd")
    timescale, duration = struct.unpack(">II", data[at + 16 : at + 24])
    return duration / timescale


async def test_every_video_is_a_small_mp4_of_its_own(tmp_path: Path) -> None:
    async with (
        Simulator(submit_time=0, processing_time=0) as sim,
        KlingClient(api_key="sim-api-key", base_url=sim.base_url) as kling,
        aiohttp.ClientSession() as http,
    ):
        files = []
        for parent in ("828006748715380777", "828006748715380778"):
            task = await kling.extend_video(parent, "on")
            done = await kling.wait_for_task(task.task_id, timeout=5)
            async with http.get(done.videos[0].url) as response:
                assert response.content_type == "video/mp4"
                data = await response.read()
            assert [kind for kind, _ in boxes(data)] == [b"ftyp", b"moov", b"mdat"]
            assert 1_000 < len(data) < 8_000  # a few KB
            assert movie_seconds(data) == pytest.approx(done.videos[0].duration)
            files.append(data)
    assert files[0] != files[1]


def test_padding_keeps_a_valid_mp4() -> None:
    data = mp4_video("v", 5.1, 300_000)
    assert len(data) == 300_000
    assert [kind for kind, _ in boxes(data)] == [b"ftyp", b"moov", b"mdat", b"free"]
    assert mp4_video("v", 5.1, 10) == mp4_video("v", 5.1)  # too small to pad: the video alone


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
def test_ffmpeg_decodes_every_frame(tmp_path: Path) -> None:
    path = tmp_path / "v.mp4"
    path.write_bytes(mp4_video("828006748715380777", 9.6))
    decoded = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "yuv420p", "-"],
        capture_output=True,
        check=True,
    )
    assert decoded.stderr == b""
    assert len(decoded.stdout) == 2 * 32 * 32 * 3 // 2  # two 32x32 frames, 4:2:0
