"""Downloading result videos: safe file names, streaming to a temp file, resume, checks.

A download streams the video into a temporary ``.part`` file next to its destination
and renames it into place only when every byte announced has arrived, so a half-written
file never appears under the final name. Result URLs live on a CDN: no credentials are
ever sent there. Transient failures are retried like API calls, through the transport's
one runner; when the server supports ranges, a retry asks only for the bytes still
missing. An answer whose ``Content-Type`` says it is not a video (a captive portal's or
a CDN's HTML error page sent with 200) is such a transient failure, never a file.

Kling's results are MP4 files, so before a download replaces anything the file itself is
checked: its top-level boxes must tile it exactly, starting with ``ftyp`` and holding a
``moov`` (`mp4_problem`; a few seeks, not a decode). An empty body, or one cut short
without a ``Content-Length`` to tell, fails that check and is retried like a cut body.

Downloads never use the caller's session (`KlingClient(session=...)`): its default
headers, auth, cookies or middlewares could carry credentials to the CDN and to every
host it redirects to. The transport keeps a bare session for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import pathlib
import re
import struct
import tempfile
import urllib.parse
from collections.abc import Iterator
from typing import IO, Final

import aiohttp

from kling_async import _protocol
from kling_async._hooks import call_back
from kling_async._models import Task, Video, is_http_url
from kling_async._transport import Transport, connection_error
from kling_async._types import OnDownloadProgress as OnProgress
from kling_async.errors import APIConnectionError, ResponseFormatError, ValidationError

CHUNK_SIZE: Final = 64 * 1024
#: File names are cut to this many characters (most file systems allow 255 bytes).
MAX_NAME_LENGTH: Final = 200

#: Besides ``video/*``: the types a CDN sends for a file it knows nothing about, and MP4's
#: own. No Content-Type at all counts as ``application/octet-stream`` (RFC 9110, 8.3).
BINARY_TYPES: Final = frozenset(
    {"application/octet-stream", "binary/octet-stream", "application/mp4"}
)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


async def download(
    transport: Transport,
    task_or_video: Task | Video,
    dest: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    on_progress: OnProgress | None = None,
) -> pathlib.Path:
    """Download a task's first result video (or a given video) to `dest`.

    Args:
        transport: the client's transport (its session, in-flight limit, timeouts and
            retry policy are used; its credentials are not).
        task_or_video: a finished `Task` (its first video is taken) or a `Video`.
        dest: an existing directory (the file is ``<video id>.mp4`` in it, the id made
            safe as a file name) or the path of the file to write.
        overwrite: replace an existing file instead of raising `FileExistsError`.
        on_progress: called (sync or async) with ``(bytes_done, bytes_total)`` once the
            answer arrives and after every chunk; `bytes_total` is None when the server
            does not say. If a retry has to start over, `bytes_done` goes back to 0.

    Returns:
        The path of the file written.

    Raises:
        ValidationError: no video to download, a URL that is not http(s), or a `dest`
            whose parent directory does not exist.
        FileExistsError: the file exists and `overwrite` is False.
        NotFoundError: the server answered 404 (the result may have expired after 30 days).
        APIStatusError: any other error status (5xx and 429 are retried first).
        ResponseFormatError: every try was answered with something that is not a video
            (``text/html`` from a proxy, say); the `Content-Type`s accepted are
            ``video/*``, `BINARY_TYPES` and none at all.
        APIConnectionError: the connection failed or the body was cut short, after retries.
        OSError: writing the file failed.
    """
    video = _pick_video(task_or_video)
    url = _check_url(video.url)
    target = _target_path(dest, video.id)
    if not overwrite and target.exists():
        raise _file_exists(target)
    shown = _without_query(url)
    fetch = _Fetch(transport, url, shown, on_progress)
    with _part_file(target) as part:
        await transport.retrying(fetch.attempt, "GET", shown, part)
        if not overwrite and target.exists():  # created while we were downloading
            raise _file_exists(target)
        await _finish(part, target)
    return target


def safe_file_name(video_id: str) -> str:
    """A file name made from a video id: only ``[A-Za-z0-9._-]``, no leading dot, never empty."""
    name = _UNSAFE.sub("_", video_id).lstrip(".")[:MAX_NAME_LENGTH]
    return name or "video"


def _pick_video(task_or_video: Task | Video) -> Video:
    if isinstance(task_or_video, Video):
        return task_or_video
    if isinstance(task_or_video, Task):
        if not task_or_video.videos:
            status = task_or_video.raw_status
            raise ValidationError(
                "task_or_video", f"task has no result video (status {status})", task_or_video
            )
        return task_or_video.videos[0]
    raise ValidationError("task_or_video", "must be a Task or a Video", task_or_video)


def _check_url(url: str) -> str:
    if not is_http_url(url):
        raise ValidationError("task_or_video", "the video URL must be an absolute http(s) URL", url)
    return url


def _without_query(url: str) -> str:
    # CDN URLs are often signed in the query string: keep that out of errors and logs.
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _target_path(dest: str | os.PathLike[str], video_id: str) -> pathlib.Path:
    if not isinstance(dest, (str, os.PathLike)):
        raise ValidationError("dest", "must be a path (str or os.PathLike)", dest)
    raw: object = os.fspath(dest)
    if not isinstance(raw, str) or not raw:
        raise ValidationError("dest", "must be a non-empty text path", dest)
    path = pathlib.Path(raw)
    if path.is_dir():
        directory = path.resolve()
        target = directory / f"{safe_file_name(video_id)}.mp4"
        # The sanitised name cannot climb out, but a symlink planted under it could.
        if not target.resolve().is_relative_to(directory):
            raise ValidationError("dest", "the file for this video would be outside dest")
        return target
    if raw.endswith(("/", os.sep)):
        raise ValidationError("dest", "directory does not exist", dest)
    if not path.parent.is_dir():
        raise ValidationError("dest", "parent directory does not exist", dest)
    return path


def mp4_problem(file: IO[bytes], size: int) -> str | None:
    """What is wrong with `file` (`size` bytes) as an MP4, or None if its boxes are sound.

    The top-level boxes (ISO/IEC 14496-12, 4.2: a 32-bit size, a type, a 64-bit size
    when the first is 1, "to the end of the file" when it is 0) must tile the file
    exactly, the first must be ``ftyp``, and there must be a ``moov`` (the index) and an
    ``mdat`` (the media). Only box headers are read: a few seeks whatever the file's size.
    """
    offset = 0
    kinds: list[bytes] = []
    while offset < size:
        file.seek(offset)
        header = file.read(16)
        if len(header) < 8:
            return f"a box header is cut short at byte {offset}"
        box_size, kind = struct.unpack(">I4s", header[:8])
        if box_size == 1:
            if len(header) < 16:
                return f"a box header is cut short at byte {offset}"
            (box_size,) = struct.unpack(">Q", header[8:16])
            smallest = 16
        else:
            smallest = 8
        if box_size == 0:  # the last box: it runs to the end of the file
            box_size = size - offset
        if box_size < smallest:
            return f"a box of impossible size {box_size} at byte {offset}"
        if not kinds and kind != b"ftyp":
            return "it does not start with an ftyp box"
        kinds.append(kind)
        offset += box_size
    if not kinds:
        return "it is empty"
    if offset != size:
        return f"its last box needs {offset} bytes but the file has {size} (cut short)"
    if b"moov" not in kinds:
        return "it has no moov box"
    if b"mdat" not in kinds:
        # Cut exactly at the end of a "fast start" moov: the boxes tile what is left,
        # but the media data is gone.
        return "it has no mdat box (cut short after its moov)"
    return None


def _file_exists(target: pathlib.Path) -> FileExistsError:
    return FileExistsError(errno.EEXIST, "file exists; pass overwrite=True to replace it", target)


async def _finish(part: _PartFile, target: pathlib.Path) -> None:
    # fsync can take a while on a big file: off the event loop. A thread cannot be
    # stopped, so a cancellation waits for it to end before the part file is cleaned up.
    finishing = asyncio.ensure_future(asyncio.to_thread(part.finish, target))
    try:
        await asyncio.shield(finishing)
    except asyncio.CancelledError:
        await asyncio.wait([finishing])
        raise


@functools.cache
def _file_mode() -> int:
    # The mode `open()` would have given the file (temp files are made 0600).
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


class _PartFile:
    """The temporary file a download is written to, next to its destination."""

    def __init__(self, target: pathlib.Path) -> None:
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        self.path = pathlib.Path(name)
        self.file: IO[bytes] = os.fdopen(fd, "w+b")
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.file.write(chunk)
        self.size += len(chunk)

    def restart(self) -> None:
        self.file.seek(0)
        self.file.truncate()
        self.size = 0

    def mp4_problem(self) -> str | None:
        """What is wrong with the bytes written so far as an MP4 (None: nothing)."""
        self.file.flush()
        try:
            return mp4_problem(self.file, self.size)
        finally:
            self.file.seek(0, os.SEEK_END)

    def finish(self, target: pathlib.Path) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.chmod(self.path, _file_mode())
        os.replace(self.path, target)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


@contextlib.contextmanager
def _part_file(target: pathlib.Path) -> Iterator[_PartFile]:
    part = _PartFile(target)
    try:
        yield part
    except BaseException:  # failure or cancellation: never leave a half-written file
        part.discard()
        raise


class _Fetch:
    """One download's attempts: each GETs what is missing and appends it to the part file."""

    def __init__(
        self, transport: Transport, url: str, shown: str, on_progress: OnProgress | None
    ) -> None:
        self._transport = transport
        self._url = url
        self._shown = shown
        self._on_progress = on_progress
        # Set from an answer that said `Accept-Ranges: bytes`: a retry may then resume.
        self._resumable = False
        self._validator: str | None = None
        # A large file may take longer than any total; a stalled read still times out
        # (after the client's `timeout` of silence), and so does a connect.
        connect = transport.timeout.sock_connect
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect, sock_connect=connect, sock_read=transport.seconds
        )

    async def attempt(self, method: str, shown: str, part: _PartFile) -> None:
        """One try: GET what is missing (`method` and `shown` are for the retry log)."""
        # identity: Content-Length must count the bytes we write, not compressed ones.
        headers = {"Accept-Encoding": "identity"}
        if part.size and self._resumable:
            headers["Range"] = f"bytes={part.size}-"
            if self._validator is not None:
                headers["If-Range"] = self._validator  # a changed file comes back whole
        elif part.size:
            part.restart()
        session = self._transport.download_session()
        async with self._transport.slot():
            try:
                async with session.get(
                    self._url,
                    headers=headers,
                    allow_redirects=True,  # safe: no credentials are attached
                    timeout=self._timeout,
                ) as response:
                    await self._receive(response, part, resuming="Range" in headers)
            except (asyncio.TimeoutError, aiohttp.ClientError) as error:
                raise connection_error(error, "GET", self._shown) from None

    async def _receive(
        self, response: aiohttp.ClientResponse, part: _PartFile, *, resuming: bool
    ) -> None:
        status = response.status
        if status in (200, 206):
            # Before touching the part file: a proxy's page must not cost the bytes we have.
            _check_content_type(response, self._shown)
        if resuming and status == 206:
            start, total = _content_range(response.headers.get("Content-Range"))
            if start != part.size:
                part.restart()
                self._resumable = False
                raise self._error(APIConnectionError, "the server sent the wrong range")
        elif resuming and status == 416:
            part.restart()
            self._resumable = False
            raise self._error(APIConnectionError, "the server refused to resume; starting over")
        elif status == 200:
            part.restart()  # a whole file, whether or not a range was asked for
            total = response.content_length if _is_identity(response) else None
        else:
            retry_after = _protocol.parse_retry_after(response.headers.get("Retry-After"))
            raise _protocol.error_for(
                status, None, f"download failed: HTTP {status}", retry_after=retry_after
            )
        self._resumable = response.headers.get("Accept-Ranges", "").strip().lower() == "bytes"
        etag = response.headers.get("ETag")
        self._validator = etag if etag and not etag.startswith("W/") else None
        expected = response.content_length if _is_identity(response) else None
        received = 0
        await call_back(self._on_progress, part.size, total)
        async for chunk in response.content.iter_chunked(CHUNK_SIZE):
            part.write(chunk)
            received += len(chunk)
            await call_back(self._on_progress, part.size, total)
        if (expected is not None and received != expected) or (
            total is not None and part.size != total
        ):
            raise self._error(
                APIConnectionError,
                f"the body was cut short ({part.size} of {total or expected} bytes)",
            )
        problem = part.mp4_problem()
        if problem is not None:
            # Bytes we cannot trust: the next try starts over, the old file is untouched.
            part.restart()
            self._resumable = False
            raise ResponseFormatError(
                f"download failed: GET {self._shown} did not give an MP4 file ({problem})",
                status=status,
            )

    def _error(self, kind: type[APIConnectionError], message: str) -> APIConnectionError:
        return kind(message, method="GET", path=self._shown)


def _check_content_type(response: aiohttp.ClientResponse, shown: str) -> None:
    media = response.content_type.strip().lower()  # no header: application/octet-stream
    if media.startswith("video/") or media in BINARY_TYPES:
        return
    # No path: "not the answer we expect at all", which the protocol retries.
    raise ResponseFormatError(
        f"download failed: GET {shown} answered {media[:80]!r}, not a video "
        "(a proxy's or a CDN's error page?)",
        status=response.status,
    )


def _is_identity(response: aiohttp.ClientResponse) -> bool:
    return response.headers.get("Content-Encoding", "identity").strip().lower() == "identity"


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """``(start, total)`` from ``Content-Range: bytes start-end/total``."""
    match = _CONTENT_RANGE.match(header or "")
    if match is None:
        return None, None
    total = match.group(3)
    return int(match.group(1)), None if total == "*" else int(total)
