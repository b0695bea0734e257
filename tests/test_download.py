"""Downloads against the simulator's files server: files, names, resume, errors, credentials."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kling_async import (
    APIConnectionError,
    APITimeoutError,
    KlingClient,
    NotFoundError,
    ResponseFormatError,
    ServerError,
    Task,
    TaskStatus,
    ValidationError,
    Video,
)
from kling_async.testing import Simulator
from kling_async.testing._files import file_bytes
from kling_async.testing._mp4 import mp4_video

FILE_SIZE = 300_000  # a few 64 KiB chunks


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(submit_time=0, processing_time=0, file_size=FILE_SIZE) as sim:
        yield sim


@pytest.fixture
async def kling(sim: Simulator) -> AsyncIterator[KlingClient]:
    async with KlingClient(api_key="sim-api-key", base_url=sim.base_url, max_retries=2) as kling:
        yield kling


@pytest.fixture
async def done(kling: KlingClient) -> Task:
    task = await kling.extend_video("743211632612511839", "go on")
    return await kling.wait_for_task(task.task_id, timeout=5)


def expected(task: Task) -> bytes:
    return file_bytes(task.videos[0].id, FILE_SIZE, task.videos[0].duration)


def file_requests(sim: Simulator) -> list[dict[str, str]]:
    return [
        {name.lower(): value for name, value in r.headers.items()}
        for r in sim.recent_requests
        if r.server == "files"
    ]


async def test_into_a_directory(
    kling: KlingClient, sim: Simulator, done: Task, tmp_path: Path
) -> None:
    path = await kling.download(done, tmp_path)
    assert path == tmp_path / f"{done.videos[0].id}.mp4"
    assert path.read_bytes() == expected(done)
    assert os.listdir(tmp_path) == [path.name]  # no .part left behind
    mode = stat.S_IMODE(path.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # as open() would make it, not the temp file's 0600


async def test_to_a_file_path_and_a_video(
    kling: KlingClient, sim: Simulator, done: Task, tmp_path: Path
) -> None:
    target = tmp_path / "mine.mp4"
    path = await kling.download(done.videos[0], str(target))
    assert path == target
    assert target.read_bytes() == expected(done)


async def test_no_authorization_header_reaches_the_files_server(
    kling: KlingClient, sim: Simulator, done: Task, tmp_path: Path
) -> None:
    await kling.download(done, tmp_path)
    seen = file_requests(sim)
    assert seen
    assert all("authorization" not in headers for headers in seen)
    assert "sim-api-key" not in repr(seen)


async def test_a_session_with_default_credentials_is_not_used_for_the_cdn(
    sim: Simulator, tmp_path: Path
) -> None:
    import aiohttp

    async with (
        aiohttp.ClientSession(headers={"Authorization": "Bearer sim-api-key"}) as session,
        KlingClient(api_key="sim-api-key", base_url=sim.base_url, session=session) as kling,
    ):
        task = await kling.extend_video("743211632612511839", "go on")
        done = await kling.wait_for_task(task.task_id, timeout=5)
        await kling.download(done, tmp_path)
        assert not session.closed
    assert all("authorization" not in headers for headers in file_requests(sim))


async def test_progress_is_monotonic_and_ends_at_the_total(
    kling: KlingClient, done: Task, tmp_path: Path
) -> None:
    sync_calls: list[tuple[int, int | None]] = []
    await kling.download(done, tmp_path, on_progress=lambda n, t: sync_calls.append((n, t)))
    assert len(sync_calls) >= 2
    assert [n for n, _ in sync_calls] == sorted(n for n, _ in sync_calls)
    assert {t for _, t in sync_calls} == {FILE_SIZE}
    assert sync_calls[-1] == (FILE_SIZE, FILE_SIZE)

    async_calls: list[int] = []

    async def record(n: int, total: int | None) -> None:
        async_calls.append(n)

    await kling.download(done, tmp_path, overwrite=True, on_progress=record)
    assert async_calls[-1] == FILE_SIZE


async def test_overwrite(kling: KlingClient, done: Task, tmp_path: Path) -> None:
    target = tmp_path / f"{done.videos[0].id}.mp4"
    target.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        await kling.download(done, tmp_path)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == [target.name]
    await kling.download(done, tmp_path, overwrite=True)
    assert target.read_bytes() == expected(done)


async def test_a_cut_body_leaves_no_file(sim: Simulator, done: Task, tmp_path: Path) -> None:
    async with KlingClient(api_key="sim-api-key", base_url=sim.base_url, max_retries=0) as kling:
        sim.inject("short_body", on="files")
        with pytest.raises(APIConnectionError) as caught:
            await kling.download(done, tmp_path)
    assert os.listdir(tmp_path) == []
    assert "GET http://" in str(caught.value)


async def test_a_retry_resumes_with_a_range(
    kling: KlingClient, sim: Simulator, done: Task, tmp_path: Path
) -> None:
    sim.inject("short_body", on="files")
    progress: list[int] = []
    path = await kling.download(done, tmp_path, on_progress=lambda n, t: progress.append(n))
    assert path.read_bytes() == expected(done)
    first, second = file_requests(sim)
    assert "range" not in first
    start = int(second["range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < start < FILE_SIZE
    assert progress == sorted(progress)  # resumed, not restarted
    assert os.listdir(tmp_path) == [path.name]


async def test_server_errors_are_retried(sim: Simulator, done: Task, tmp_path: Path) -> None:
    async with KlingClient(api_key="sim-api-key", base_url=sim.base_url, max_retries=1) as kling:
        sim.inject("503", on="files")
        path = await kling.download(done, tmp_path)
        assert path.read_bytes() == expected(done)
        sim.inject("500", on="files", times=2)
        with pytest.raises(ServerError):
            await kling.download(done, tmp_path, overwrite=True)
    assert os.listdir(tmp_path) == [path.name]
    assert len(file_requests(sim)) == 4


async def test_not_found(kling: KlingClient, sim: Simulator, tmp_path: Path) -> None:
    gone = Video(id="123", url=sim.video_url("no-such-video"), duration=5.0)
    with pytest.raises(NotFoundError) as caught:
        await kling.download(gone, tmp_path)
    assert caught.value.status == 404
    assert len(file_requests(sim)) == 1  # not retried
    assert os.listdir(tmp_path) == []


async def test_a_hostile_id_stays_inside_dest(
    kling: KlingClient, sim: Simulator, done: Task, tmp_path: Path
) -> None:
    dest = tmp_path / "a" / "b"
    dest.mkdir(parents=True)
    hostile = Video(id="../../etc/x", url=done.videos[0].url, duration=5.0)
    path = await kling.download(hostile, dest)
    assert path.parent == dest.resolve()
    assert path.name == "_.._etc_x.mp4"
    assert os.listdir(tmp_path) == ["a"]
    assert os.listdir(tmp_path / "a") == ["b"]


async def test_a_symlink_under_dest_cannot_redirect_the_write(
    kling: KlingClient, done: Task, tmp_path: Path
) -> None:
    dest, elsewhere = tmp_path / "dest", tmp_path / "elsewhere"
    dest.mkdir()
    elsewhere.mkdir()
    (dest / f"{done.videos[0].id}.mp4").symlink_to(elsewhere / "target.mp4")
    with pytest.raises(ValidationError, match="outside dest"):
        await kling.download(done, dest, overwrite=True)
    assert os.listdir(elsewhere) == []


@pytest.mark.parametrize(
    ("video_id", "name"),
    [
        ("828006748715380778", "828006748715380778"),
        ("a b/c\\d", "a_b_c_d"),
        ("...", "video"),
        ("", "video"),
        (".hidden", "hidden"),
        ("vidéo", "vid_o"),
        ("x" * 300, "x" * 200),
    ],
)
async def test_file_names_are_made_safe(
    kling: KlingClient, done: Task, tmp_path: Path, video_id: str, name: str
) -> None:
    video = Video(id=video_id, url=done.videos[0].url, duration=5.0)
    path = await kling.download(video, tmp_path)
    assert path.name == f"{name}.mp4"
    assert os.listdir(tmp_path) == [path.name]


async def test_cancelling_leaves_no_file(kling: KlingClient, done: Task, tmp_path: Path) -> None:
    started = asyncio.Event()

    async def stall(n: int, total: int | None) -> None:
        if n:
            started.set()
            await asyncio.Event().wait()  # until cancelled

    downloading = asyncio.ensure_future(kling.download(done, tmp_path, on_progress=stall))
    await asyncio.wait_for(started.wait(), 5)
    assert len(os.listdir(tmp_path)) == 1  # the .part file
    downloading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await downloading
    assert os.listdir(tmp_path) == []


async def test_bad_arguments(kling: KlingClient, done: Task, tmp_path: Path) -> None:
    unfinished = Task(task_id="t1", status=TaskStatus.PROCESSING, raw_status="processing")
    with pytest.raises(
        ValidationError, match=r"task_or_video: task has no result video \(status processing\)"
    ):
        await kling.download(unfinished, tmp_path)
    with pytest.raises(ValidationError, match="task_or_video"):
        await kling.download("828006748715380778", tmp_path)  # type: ignore[arg-type]
    for url in ("file:///etc/passwd", "ftp://cdn/x.mp4", "not a url", "http://"):
        with pytest.raises(ValidationError, match="http"):
            await kling.download(Video(id="v", url=url, duration=1.0), tmp_path)
    with pytest.raises(ValidationError, match="parent directory"):
        await kling.download(done, tmp_path / "missing" / "x.mp4")
    with pytest.raises(ValidationError, match="directory does not exist"):
        await kling.download(done, f"{tmp_path / 'missing'}/")
    with pytest.raises(ValidationError, match="dest"):
        await kling.download(done, 42)  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == []


async def test_connection_failures_become_our_errors(
    sim: Simulator, done: Task, tmp_path: Path
) -> None:
    async with KlingClient(
        api_key="sim-api-key", base_url=sim.base_url, max_retries=0, timeout=0.2
    ) as kling:
        sim.inject("slow", on="files", delay=2.0)
        with pytest.raises(APITimeoutError):
            await kling.download(done, tmp_path)
    sim.clear_faults()
    # A generous timeout from here: a busy machine must not turn a dropped connection
    # into a timeout.
    async with KlingClient(
        api_key="sim-api-key", base_url=sim.base_url, max_retries=0, timeout=30.0
    ) as kling:
        # aiohttp itself re-sends once when a reused keep-alive connection drops.
        sim.inject("drop_before", on="files", times=2)
        with pytest.raises(APIConnectionError, match="connection failed"):
            await kling.download(done, tmp_path)
        refused = Video(id="v", url="http://127.0.0.1:1/v.mp4", duration=1.0)
        with pytest.raises(APIConnectionError, match="could not connect") as caught:
            await kling.download(refused, tmp_path)
        assert caught.value.sent is False
    assert os.listdir(tmp_path) == []


# -- answers that are not a video -------------------------------------------------------


async def test_a_proxy_page_is_retried_not_saved(
    kling: KlingClient, sim: Simulator, done: Task, tmp_path: Path
) -> None:
    sim.inject("html", on="files")  # 200 text/html: a captive portal, a CDN's error page
    path = await kling.download(done, tmp_path)
    assert path.read_bytes() == expected(done)
    assert len(file_requests(sim)) == 2
    assert os.listdir(tmp_path) == [path.name]


@pytest.mark.parametrize("overwrite", [True, False])
async def test_a_proxy_page_never_replaces_a_file(
    kling: KlingClient, sim: Simulator, done: Task, tmp_path: Path, overwrite: bool
) -> None:
    target = tmp_path / f"{done.videos[0].id}.mp4"
    target.write_bytes(b"the user's own file")
    sim.inject("html", on="files", times=3)  # every try of max_retries=2
    if overwrite:
        with pytest.raises(ResponseFormatError, match="text/html") as caught:
            await kling.download(done, tmp_path, overwrite=True)
        assert caught.value.status == 200
        assert len(file_requests(sim)) == 3  # retried as a transient fault
    else:
        with pytest.raises(FileExistsError):
            await kling.download(done, tmp_path)
        assert file_requests(sim) == []
    assert target.read_bytes() == b"the user's own file"
    assert os.listdir(tmp_path) == [target.name]


async def test_a_proxy_page_leaves_no_new_file(
    kling: KlingClient, sim: Simulator, done: Task, tmp_path: Path
) -> None:
    sim.inject("html", on="files", times=3)
    with pytest.raises(ResponseFormatError):
        await kling.download(done, tmp_path / "new.mp4")
    assert os.listdir(tmp_path) == []


async def test_a_proxy_page_on_a_resume_keeps_the_bytes_already_there(
    kling: KlingClient, sim: Simulator, done: Task, tmp_path: Path
) -> None:
    sim.inject("short_body", on="files")
    sim.inject("html", on="files")
    progress: list[int] = []
    path = await kling.download(done, tmp_path, on_progress=lambda n, t: progress.append(n))
    assert path.read_bytes() == expected(done)
    first, page, last = file_requests(sim)
    assert "range" not in first
    assert page["range"] == last["range"] != "bytes=0-"  # resumed from the same byte
    assert progress == sorted(progress)


async def serve_raw(answer: bytes) -> tuple[asyncio.Server, str]:
    """A bare HTTP server on 127.0.0.1 that sends `answer` (headers as given, nothing
    added: aiohttp's server would add a Content-Type) to every request."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/v.mp4?sig=secret-token"


BODY = mp4_video("v", 1.0)  # a real MP4: the file check passes


@pytest.mark.parametrize(
    ("content_type", "accepted"),
    [
        ("video/mp4", True),
        ("Video/MP4; codecs=avc1", True),
        ("video/quicktime", True),
        ("application/octet-stream", True),
        ("binary/octet-stream", True),  # S3's default for an object stored without a type
        ("application/mp4", True),
        (None, True),  # no header at all: application/octet-stream (RFC 9110)
        ("text/html; charset=utf-8", False),
        ("text/plain", False),
        ("application/json", False),
        ("application/xml", False),
        ("image/png", False),
    ],
)
async def test_which_content_types_are_a_video(
    sim: Simulator, tmp_path: Path, content_type: str | None, accepted: bool
) -> None:
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(BODY)}\r\nConnection: close\r\n"
    if content_type is not None:
        head += f"Content-Type: {content_type}\r\n"
    server, url = await serve_raw(head.encode() + b"\r\n" + BODY)
    async with server, KlingClient(api_key="k", base_url=sim.base_url, max_retries=0) as kling:
        video = Video(id="v", url=url, duration=1.0)
        if accepted:
            path = await kling.download(video, tmp_path)
            assert path.read_bytes() == BODY
        else:
            with pytest.raises(ResponseFormatError, match="not a video") as caught:
                await kling.download(video, tmp_path)
            assert "secret-token" not in str(caught.value)
            assert os.listdir(tmp_path) == []


# -- the file on disk is an MP4, whole ---------------------------------------------------


async def test_an_empty_body_is_retried_and_never_saved(
    kling: KlingClient, sim: Simulator, done: Task, tmp_path: Path
) -> None:
    old = tmp_path / "old.mp4"
    old.write_bytes(b"the previous video")
    sim.inject("empty_data", on="files", times=3)  # 200, Content-Length: 0; every try
    with pytest.raises(ResponseFormatError, match="not give an MP4 file"):
        await kling.download(done, old, overwrite=True)
    assert old.read_bytes() == b"the previous video"
    assert os.listdir(tmp_path) == ["old.mp4"]
    sim.inject("empty_data", on="files")  # once: the retry gets the file
    assert (await kling.download(done, old, overwrite=True)).read_bytes() == expected(done)


async def test_a_body_cut_without_framing_is_retried_and_never_saved(
    kling: KlingClient, sim: Simulator, done: Task, tmp_path: Path
) -> None:
    # Half the file, no Content-Length, no chunks: the end of the connection looks like
    # the end of the file. Only the MP4's own boxes tell.
    sim.inject("truncated", on="files", times=3)
    with pytest.raises(ResponseFormatError, match="cut short"):
        await kling.download(done, tmp_path)
    assert os.listdir(tmp_path) == []
    sim.inject("truncated", on="files")
    path = await kling.download(done, tmp_path)
    assert path.read_bytes() == expected(done)
    assert sim.counters.file_requests == 5


def test_the_mp4_check_refuses_every_truncation() -> None:
    import io

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from kling_async._download import mp4_problem

    video = mp4_video("828006748715380777", 5.1)
    assert mp4_problem(io.BytesIO(video), len(video)) is None

    @settings(deadline=None)  # a busy machine is slow, not wrong
    @given(st.integers(min_value=0, max_value=len(video) - 1))
    def cut(size: int) -> None:
        assert mp4_problem(io.BytesIO(video[:size]), size) is not None

    @settings(deadline=None)
    @given(st.binary(max_size=64))
    def garbage(data: bytes) -> None:
        assert mp4_problem(io.BytesIO(data), len(data)) is not None

    cut()
    garbage()
    # Every cut at a box boundary too (the one Hypothesis found: right after the moov).
    offset = 0
    while offset < len(video):
        offset += int.from_bytes(video[offset : offset + 4], "big")
        if offset < len(video):
            assert mp4_problem(io.BytesIO(video[:offset]), offset) is not None, offset
    # No moov, or not starting with ftyp: refused even when the boxes tile the file.
    no_moov = video[:32] + b"\0\0\0\x08free"
    assert mp4_problem(io.BytesIO(video[:32]), 32) == "it has no moov box"
    assert "ftyp" in (mp4_problem(io.BytesIO(no_moov[8:]), len(no_moov) - 8) or "")


# -- downloads carry nothing of the caller's session ---------------------------------------


async def test_a_session_middleware_never_reaches_the_cdn_or_a_redirect(
    sim: Simulator, tmp_path: Path
) -> None:
    import aiohttp
    from aiohttp import web

    secret = "sk-middleware-secret"
    seen: list[dict[str, str]] = []

    async def redirect(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.headers))
        raise web.HTTPFound(sim.video_url(request.match_info["id"]))

    async def add_key(
        request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        # The API's own requests keep the client's key; anything else would get this one.
        request.headers.setdefault("Authorization", f"Bearer {secret}")
        request.headers["X-Api-Key"] = secret
        return await handler(request)

    app = web.Application()
    app.router.add_get("/r/{id}", redirect)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with (
            aiohttp.ClientSession(middlewares=(add_key,), cookies={"c": secret}) as session,
            KlingClient(api_key="sim-api-key", base_url=sim.base_url, session=session) as kling,
        ):
            task = await kling.extend_video("743211632612511839", "go on")
            done = await kling.wait_for_task(task.task_id, timeout=5)
            video = done.videos[0]
            await kling.download(done, tmp_path)
            hop = Video(video.id, f"http://127.0.0.1:{port}/r/{video.id}", video.duration)
            await kling.download(hop, tmp_path / "hop.mp4")
            assert not session.closed
    finally:
        await runner.cleanup()
    assert len(seen) == 1
    assert secret not in repr(seen) + repr(file_requests(sim))
    assert all("authorization" not in headers for headers in file_requests(sim))


async def test_a_bad_dest_names_the_path(kling: KlingClient, done: Task, tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as caught:
        await kling.download(done, tmp_path / "nowhere" / "x.mp4")
    assert str(tmp_path / "nowhere" / "x.mp4") in str(caught.value)
