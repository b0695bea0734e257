"""The one place that does HTTP: the session, the in-flight limit, timeouts, auth, retries.

Each attempt takes a slot of the `max_in_flight` semaphore only while its request is
open; backoff's sleeps between attempts hold no slot. Every response is read and
released inside ``async with``, on every path. aiohttp's own exceptions never escape:
their reprs can carry request headers, so `connection_error` turns them into ours,
built from the method, the path and the exception's class only.

`Transport.retrying` is the one retry runner (API calls, creates and downloads all go
through it): the rules of what is retried live in `kling_async._protocol`, the waits
(exponential with full jitter, ``Retry-After`` kept exactly) in backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable, Generator
from typing import Any, Final, TypeVar, cast

import aiohttp
import backoff
import orjson
from yarl import URL

from kling_async import _protocol, _telemetry
from kling_async._auth import Auth
from kling_async.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    KlingError,
    ResponseFormatError,
)

T = TypeVar("T")

logger = logging.getLogger("kling_async")

#: Which try of a call is running (1 = the first), for log lines.
_ATTEMPT: contextvars.ContextVar[int] = contextvars.ContextVar("kling_attempt", default=1)

#: While `send` runs inside its telemetry report: where it puts the HTTP status it got.
_REPORTED: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "kling_reported", default=None
)

#: First retry waits up to this long (full jitter), doubling per attempt ...
RETRY_BASE: Final = 0.5
#: ... up to this.
RETRY_CAP: Final = 8.0

_JSON_HEADERS: Final = {"Accept": "application/json"}

#: The largest answer body read from the API (a page of 500 tasks is well under 1 MB).
#: A bigger one is refused without reading past this many bytes (a broken or hostile
#: server must not fill the memory): `ResponseFormatError`, retried as a garbled answer.
MAX_ANSWER_BYTES: Final = 4 * 1024 * 1024
_READ_SIZE: Final = 64 * 1024


_RETRIED: Final = frozenset({_protocol.Action.RETRY, _protocol.Action.WAIT_FOR_SLOT})
_RETRIED_WITH_SLOTS: Final = frozenset({_protocol.Action.RETRY})


class ExactWait(float):
    """A wait the service asked for (``Retry-After``): used as given, never jittered."""


#: The backoff in use: (first wait, longest wait); `set_retry_waits` changes it.
_RETRY_WAITS: list[float] = [RETRY_BASE, RETRY_CAP]


def set_retry_waits(base: float = RETRY_BASE, cap: float = RETRY_CAP) -> None:
    """Our own backoff between tries, process-wide (`kling_async.testing.set_testing`
    shortens it); a wait the service asks for is never shortened."""
    _RETRY_WAITS[:] = [base, cap]


def retry_waits() -> Generator[float | None, BaseException | None, None]:
    """backoff wait generator: exponential (`set_retry_waits`), but the service's wait
    (`_protocol.decide`: its ``Retry-After``, at least a second after a 429) wins."""
    base, cap = _RETRY_WAITS
    error = yield None  # backoff primes the generator with send(None)
    n = 0
    while True:
        wait = _protocol.decide(error).wait if error is not None else None
        if wait is not None:
            error = yield ExactWait(wait)
        else:
            error = yield min(cap, base * 2**n)
            n += 1


def jitter(value: float) -> float:
    """Full jitter for our own backoff; a server-given wait is kept exactly."""
    return value if isinstance(value, ExactWait) else backoff.full_jitter(value)


def _log_backoff(details: Any) -> None:
    error = details.get("exception")
    logger.info(
        "retrying %s %s in %.3f s after attempt %d: %s",
        details["args"][1],
        details["args"][2],
        details["wait"],
        details["tries"],
        type(error).__name__ if error is not None else "?",
        extra={"kling_wait": details["wait"], "kling_attempt": details["tries"]},
    )


def connection_error(error: BaseException, method: str, path: str) -> APIConnectionError:
    """Our error for aiohttp's (whose reprs may carry request headers): class name only."""
    name = type(error).__name__
    if isinstance(error, aiohttp.ConnectionTimeoutError):
        return APITimeoutError("connect timed out", method=method, path=path, sent=False)
    if isinstance(error, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return APITimeoutError("timed out", method=method, path=path)
    if isinstance(error, aiohttp.ClientConnectorError):
        # The host and port, never the URL: a base URL's path is not the server's name.
        where = f"{error.host}:{error.port}" if error.port else error.host
        return APIConnectionError(
            f"could not connect to {where} ({name})", method=method, path=path, sent=False
        )
    return APIConnectionError(f"connection failed ({name})", method=method, path=path)


class Transport:
    """Sends requests to the API's origin with auth, limits, timeouts and retries."""

    def __init__(
        self,
        *,
        base_url: str,
        auth: Auth,
        max_in_flight: int,
        max_retries: int,
        timeout: float,
        session: aiohttp.ClientSession | None,
    ) -> None:
        self.base_url = base_url
        # Paths come already encoded from the protocol; the base is encoded once here.
        self._base = str(URL(base_url))
        self.max_retries = max_retries
        self.max_in_flight = max_in_flight
        self._auth = auth
        self._semaphore = asyncio.Semaphore(max_in_flight)
        self._session = session
        self._owns_session = session is None
        # Downloads go to result hosts (a CDN) through a session of their own that carries
        # nothing: no auth, default headers, cookies or middlewares of a caller's session.
        self._download_session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._headers: dict[str, str] = {}
        self._runners: dict[bool, Callable[..., Awaitable[Any]]] = {}
        #: Seconds one API request may take in all, and the longest silence of a download.
        self.seconds = timeout
        # The total bounds an API call (its reads included). Only a new socket's connect
        # gets a timer of its own: every timer aiohttp arms is a heap entry made and
        # cancelled per request, measurable on the success path (docs/performance.md).
        self.timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, 30.0))
        # Our own session has our timeout as its default; a session passed in keeps its
        # own default, so ours goes with each request.
        self._per_request: dict[str, Any] = {} if session is None else {"timeout": self.timeout}

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def session(self) -> aiohttp.ClientSession:
        """The session, created on first use inside the running event loop.

        Raises:
            RuntimeError: the client is closed, or used from another event loop than the
                one it first ran in.
        """
        loop = asyncio.get_running_loop()
        if self._session is not None and self._loop is loop:
            return self._session
        if self._closed:
            raise RuntimeError("this KlingClient is closed; create a new one")
        if self._loop is not loop:
            self._bind(loop)
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_in_flight), timeout=self.timeout
            )
        return self._session

    def download_session(self) -> aiohttp.ClientSession:
        """The bare session downloads use (created on first use; see `session`)."""
        self.session()  # the closed and event-loop checks
        if self._download_session is None:
            self._download_session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_in_flight),
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=self.timeout,
            )
        return self._download_session

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is None:
            self._loop = loop
            return
        # aiohttp's sessions, connections and our semaphore belong to one loop. The old
        # loop is gone or busy elsewhere: close what we own without it, then say so.
        self._closed = True
        if self._owns_session and self._session is not None:
            _close_without_loop(self._session)
        if self._download_session is not None:
            _close_without_loop(self._download_session)
        self._session = self._download_session = None
        raise RuntimeError(
            "this KlingClient belongs to the event loop it first ran in and cannot be used "
            "from another one (e.g. a second asyncio.run()); create one client per loop, "
            "inside it, and close it there (async with KlingClient() as kling: ...)"
        )

    def slot(self) -> asyncio.Semaphore:
        """The in-flight limit; hold it only while a request is open."""
        return self._semaphore

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        session, self._session = self._session, None
        downloads, self._download_session = self._download_session, None
        other_loop = self._loop is not None and asyncio.get_running_loop() is not self._loop
        for owned in (session if self._owns_session else None, downloads):
            if owned is None:
                continue
            if other_loop:
                _close_without_loop(owned)
            else:
                await owned.close()

    # -- one attempt -------------------------------------------------------------------

    def _headers_for(self, authorization: str) -> dict[str, str]:
        # Built once per token (a bearer key: once), not once per request.
        headers = self._headers
        if headers.get("Authorization") != authorization:
            headers = self._headers = {**_JSON_HEADERS, "Authorization": authorization}
        return headers

    async def send(
        self, method: str, path: str, body: Any = None, *, resigned: bool = False
    ) -> tuple[Any, str | None]:
        """One request, no retries (but a JWT expired in flight is re-signed once).

        Returns:
            The envelope's ``(data, request_id)``.
        """
        session = self.session()
        headers = self._headers_for(self._auth.header())
        data: bytes | None = None
        if body is not None:
            data = orjson.dumps(body)
            headers = {**headers, "Content-Type": "application/json"}
        debug = logger.isEnabledFor(logging.DEBUG)
        started = time.perf_counter() if debug else 0.0
        if _telemetry.AVAILABLE and _telemetry.enabled() and _REPORTED.get() is None:
            report = _telemetry.http_span(
                method, self._base + path, _ATTEMPT.get() - 1, time.perf_counter()
            )
            if report is not None:
                return await self._send_reported(report, method, path, body, resigned)
        async with self._semaphore:
            try:
                async with session.request(
                    method,
                    URL(self._base + path, encoded=True),
                    data=data,
                    headers=headers,
                    allow_redirects=False,
                    **self._per_request,
                ) as response:
                    payload = await _read_capped(response, method, path)
                    status = response.status
                    response_headers = response.headers
                if _telemetry.AVAILABLE:
                    reported = _REPORTED.get()
                    if reported is not None:
                        reported.append(status)
            except (asyncio.TimeoutError, aiohttp.ClientError) as error:
                failure = connection_error(error, method, path)
                if debug:
                    _log(method, path, type(failure).__name__, None, None, started)
                raise failure from None
        try:
            decoded = _protocol.decode_envelope(
                status, response_headers, payload, self._auth.secrets()
            )
        except KlingError as error:
            if debug:
                code = getattr(error, "code", None)
                _log(method, path, status, code, getattr(error, "request_id", None), started)
            if resigned or not _protocol.is_token_expired(error) or not self._auth.invalidate():
                raise
            logger.info("token expired (code 1004); re-signing and sending again")
            return await self.send(method, path, body, resigned=True)
        if debug:
            _log(method, path, status, 0, decoded[1], started)
        return decoded

    async def _send_reported(
        self,
        report: _telemetry.HttpSpan,
        method: str,
        path: str,
        body: Any,
        resigned: bool,
    ) -> tuple[Any, str | None]:
        """`send`, with its outcome handed to telemetry (status, or the error's class)."""
        statuses: list[int] = []
        error_type: str | None = None
        token = _REPORTED.set(statuses)
        try:
            return await self.send(method, path, body, resigned=resigned)
        except APIStatusError as error:
            error_type = str(error.status) if error.status >= 400 else type(error).__name__
            raise
        except BaseException as error:
            # Our exception's class (a 2xx that is not the envelope, a timeout ...).
            error_type = type(error).__name__
            raise
        finally:
            _REPORTED.reset(token)
            report.end(statuses[-1] if statuses else None, error_type, time.perf_counter())

    # -- retries -----------------------------------------------------------------------

    async def retrying(
        self,
        attempt: Callable[..., Awaitable[T]],
        method: str,
        path: str,
        *args: Any,
        slots: bool = False,
    ) -> T:
        """``await attempt(method, path, *args)`` until it succeeds, `_protocol.decide`
        says not to retry, or `max_retries` retries have been made (backoff waits
        between tries). With `slots` (a create with an account), a full account (1303)
        is not retried here: the caller waits for a slot.

        The first try runs outside backoff: most calls succeed, and backoff's bookkeeping
        would cost more than a create's own parsing. A failure is replayed as backoff's
        first try, so whether and how long to wait is decided by backoff alone.
        """
        try:
            return await attempt(method, path, *args)
        except KlingError as error:
            first: KlingError | None = error
        runner = self._runners.get(slots)
        if runner is None:
            runner = self._runners[slots] = self._make_runner(slots)
        tries = 1

        async def replay(method: str, path: str, *args: Any) -> T:
            nonlocal first, tries
            if first is not None:
                error, first = first, None
                raise error
            tries += 1
            token = _ATTEMPT.set(tries)  # for the log lines of this try
            try:
                return await attempt(method, path, *args)
            finally:
                _ATTEMPT.reset(token)

        result: T = await runner(replay, method, path, *args)
        return result

    def _make_runner(self, slots: bool) -> Callable[..., Awaitable[Any]]:
        # Decorating is not free (backoff inspects its handlers each time), so each
        # kind of call gets one decorated runner per transport, built on first use.
        retried = _RETRIED_WITH_SLOTS if slots else _RETRIED

        @backoff.on_exception(
            cast("Callable[..., Generator[float, None, None]]", retry_waits),
            KlingError,
            max_tries=self.max_retries + 1,
            jitter=jitter,
            giveup=lambda error: _protocol.decide(error).action not in retried,
            on_backoff=_log_backoff,
            logger=None,
        )
        async def run(attempt: Callable[..., Awaitable[Any]], *args: Any) -> Any:
            return await attempt(*args)

        return run


async def _read_capped(response: aiohttp.ClientResponse, method: str, path: str) -> bytes:
    """The body, or `ResponseFormatError` as soon as it passes `MAX_ANSWER_BYTES`.

    A `Content-Length` over the cap is refused unread; a body of unknown or compressed
    size is read in chunks and refused at the first byte past the cap.
    """
    length = response.content_length
    compressed = "Content-Encoding" in response.headers
    if length is not None and length <= MAX_ANSWER_BYTES and not compressed:
        return await response.read()
    if length is None or compressed:
        chunks: list[bytes] = []
        size = 0
        while chunk := await response.content.read(_READ_SIZE):
            size += len(chunk)
            if size > MAX_ANSWER_BYTES:
                break
            chunks.append(chunk)
        else:
            return b"".join(chunks)
    # Leaving `async with` closes the connection with the rest unread.
    raise ResponseFormatError(
        f"{method} {path}: the answer is larger than {MAX_ANSWER_BYTES // 2**20} MiB; "
        "refused without reading the rest",
        status=response.status,
    )


def _log(
    method: str,
    path: str,
    status: int | str,
    code: int | None,
    request_id: str | None,
    started: float,
) -> None:
    # Only the method and the path (ids, page numbers): never headers or the base URL,
    # so neither a key nor anything a proxy put in the URL can reach a log.
    elapsed = time.perf_counter() - started
    attempt = _ATTEMPT.get()
    logger.debug(
        "%s %s -> %s code=%s request_id=%s attempt=%d in %.3f s",
        method,
        path,
        status,
        code,
        request_id,
        attempt,
        elapsed,
        extra={
            "kling_method": method,
            "kling_path": path,
            "kling_status": status,
            "kling_code": code,
            "kling_request_id": request_id,
            "kling_attempt": attempt,
            "kling_elapsed": elapsed,
        },
    )


def _close_without_loop(session: aiohttp.ClientSession) -> None:
    """Close a session whose event loop is gone: its sockets directly, then the session.

    The loop that owns the connections can no longer run their close callbacks, so the
    sockets are closed here and the session detached; nothing is left to warn about.
    """
    connector = session.connector
    session.detach()  # the session counts as closed from now on
    if connector is None:
        return
    for protocols in list(getattr(connector, "_conns", {}).values()):
        for protocol, _ in protocols:
            transport = getattr(protocol, "transport", None)
            sock = getattr(transport, "_sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
                transport._sock = None  # type: ignore[union-attr]
    getattr(connector, "_conns", {}).clear()
    connector._closed = True
