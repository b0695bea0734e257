"""The result-file server's content: a real MP4 per video (see `_mp4`), with `Range` support."""

from __future__ import annotations

import functools
import hashlib
import re

from aiohttp import web

from ._faults import send_short_body, send_unframed_body
from ._mp4 import mp4_video

__all__ = ["file_bytes", "serve_file"]

_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


@functools.lru_cache(maxsize=64)
def file_bytes(video_id: str, size: int, duration: float = 5.0) -> bytes:
    """The playable MP4 of `video_id` (`duration` seconds), padded to `size` bytes.

    A `size` smaller than the video itself (about 4 KB) gives the video unpadded.
    """
    return mp4_video(video_id, duration, size)


def _parse_range(header: str, size: int) -> tuple[int, int] | bool | None:
    """`(start, end_exclusive)`, `None` to ignore the header, `False` when unsatisfiable."""
    match = _RANGE.match(header)
    if match is None:
        return None  # malformed or multi-range: ignored, the whole file is served
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # suffix range: the last N bytes
        length = int(last)
        if length == 0:
            return False
        return max(size - length, 0), size
    start = int(first)
    end = size if not last else min(int(last) + 1, size)
    if start >= size or (last and int(last) < start):
        return False
    return start, end


async def serve_file(
    request: web.Request,
    video_id: str,
    size: int,
    duration: float,
    *,
    cut_short: bool,
    unframed: bool = False,
) -> web.StreamResponse:
    """Serve the video's bytes (200, or 206 for a `Range`); `cut_short` closes mid-body,
    after announcing the whole length or, `unframed`, announcing none."""
    content = file_bytes(video_id, size, duration)
    size = len(content)
    etag = '"' + hashlib.sha256(content).hexdigest()[:32] + '"'
    headers = {"Accept-Ranges": "bytes", "ETag": etag}
    status = 200
    header = request.headers.get("Range")
    if header is not None:
        parsed = _parse_range(header, size)
        if parsed is False:
            headers["Content-Range"] = f"bytes */{size}"
            return web.Response(status=416, headers=headers)
        if isinstance(parsed, tuple):
            start, end = parsed
            content = content[start:end]
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
            status = 206
    if cut_short and unframed and request.method != "HEAD":
        return await send_unframed_body(request, content, status=status, content_type="video/mp4")
    if cut_short and request.method != "HEAD":
        return await send_short_body(
            request, content, status=status, content_type="video/mp4", headers=headers
        )
    return web.Response(body=content, status=status, content_type="video/mp4", headers=headers)
