"""The one place that does HTTP: the session, the in-flight limit, timeouts, auth, retries.

Each attempt takes a slot of the `max_in_flight` semaphore only while its request is
open; backoff's sleeps between attempts hold no slot. Every response is read and
released inside ``async with``, on every path. aiohttp's own exceptions never escape:
their reprs can carry request headers, so they become our errors, built from the
method, the path and the exception's class only.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable, Generator, Mapping
from typing import Any, Final, TypeVar, cast

import aiohttp
import backoff
import orjson

from kling_async import _protocol
from kling_async._auth import Auth
from kling_async._protocol import Envelope
from kling_async.errors import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    KlingError,
)

T = TypeVar("T")

logger = logging.getLogger("kling_async")

#: Which try of a call is running (1 = the first), for log lines.
_ATTEMPT: contextvars.ContextVar[int] = contextvars.ContextVar("kling_attempt", default=1)

#: First retry waits up to this long (full jitter), doubling per attempt ...
RETRY_BASE: Final = 0.5
#: ... up to this.
RETRY_CAP: Final = 8.0


class ExactWait(float):
    """A wait the service asked for (``Retry-After``): used as given, never jittered."""


def retry_waits(
    base: float = RETRY_BASE, cap: float = RETRY_CAP
) -> Generator[float | None, BaseException | None, None]:
    """backoff wait generator: exponential, but a `Retry-After` on the error wins."""
    error = yield None  # backoff primes the generator with send(None)
    n = 0
    while True:
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            error = yield ExactWait(retry_after)
        else:
            error = yield min(cap, base * 2**n)
            n += 1


def jitter(value: float) -> float:
    """Full jitter for our own backoff; a server-given wait is kept exactly."""
    return value if isinstance(value, ExactWait) else backoff.full_jitter(value)


def _log_backoff(details: Any) -> None:
    error = details.get("exception")
    logger.info(
        "retrying %s in %.3f s after attempt %d: %s",
        details["args"][1],
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
        return APIConnectionError(
            f"could not connect ({name})", method=method, path=path, sent=False
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
        self.max_retries = max_retries
        self.max_in_flight = max_in_flight
        self._auth = auth
        self._semaphore = asyncio.Semaphore(max_in_flight)
        self._session = session
        self._owns_session = session is None
        self._closed = False
        self._runners: dict[
            Callable[[BaseException], bool],
            Callable[[Callable[[], Awaitable[Any]], str], Awaitable[Any]],
        ] = {}
        self.timeout = aiohttp.ClientTimeout(
            total=timeout, connect=min(timeout, 30.0), sock_read=timeout
        )
        # Our own session has our timeout as its default; a session passed in keeps its
        # own default, so ours goes with each request.
        self._per_request: dict[str, Any] = {} if session is None else {"timeout": self.timeout}

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def session(self) -> aiohttp.ClientSession:
        """The session, created on first use inside the running event loop."""
        if self._closed:
            raise RuntimeError("this KlingClient is closed; create a new one")
        if self._session is None:
            asyncio.get_running_loop()  # a session must be born inside a running loop
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_in_flight),
                timeout=self.timeout,
            )
        return self._session

    def slot(self) -> asyncio.Semaphore:
        """The in-flight limit; hold it only while a request is open."""
        return self._semaphore

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None

    # -- one attempt -------------------------------------------------------------------

    async def send(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Any = None,
    ) -> Envelope:
        """One request (re-signing once on an expired token), no retries."""
        try:
            return await self._send_once(method, path, query, body)
        except AuthenticationError as error:
            if error.code != _protocol.TOKEN_EXPIRED_CODE or not self._auth.invalidate():
                raise
            logger.info("token expired (code 1004); re-signing and sending again")
            return await self._send_once(method, path, query, body)

    async def _send_once(
        self, method: str, path: str, query: Mapping[str, str] | None, body: Any
    ) -> Envelope:
        session = self.session()
        headers = {"Authorization": self._auth.header(), "Accept": "application/json"}
        data: bytes | None = None
        if body is not None:
            data = orjson.dumps(body)
            headers["Content-Type"] = "application/json"
        started = time.perf_counter()
        async with self._semaphore:
            try:
                async with session.request(
                    method,
                    self.base_url + path,
                    params=query,
                    data=data,
                    headers=headers,
                    allow_redirects=False,
                    **self._per_request,
                ) as response:
                    payload = await response.read()
                    status = response.status
                    response_headers = response.headers
            except (asyncio.TimeoutError, aiohttp.ClientError) as error:
                failure = connection_error(error, method, path)
                if logger.isEnabledFor(logging.DEBUG):
                    self._log(method, path, type(failure).__name__, None, None, started)
                raise failure from None
        try:
            envelope = _protocol.decode_envelope(status, response_headers, payload)
        except KlingError as error:
            if logger.isEnabledFor(logging.DEBUG):
                self._log(
                    method,
                    path,
                    status,
                    getattr(error, "code", None),
                    getattr(error, "request_id", None),
                    started,
                )
            raise
        if logger.isEnabledFor(logging.DEBUG):
            self._log(method, path, status, 0, envelope.request_id, started)
        return envelope

    @staticmethod
    def _log(
        method: str,
        path: str,
        status: int | str,
        code: int | None,
        request_id: str | None,
        started: float,
    ) -> None:
        # Only the method and the path (ids, page numbers): never headers or the base
        # URL, so neither a key nor anything a proxy put in the URL can reach a log.
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

    # -- retries -----------------------------------------------------------------------

    async def retrying(
        self,
        attempt: Callable[[], Awaitable[T]],
        *,
        name: str,
        retry_if: Callable[[BaseException], bool] = _protocol.is_retryable,
    ) -> T:
        """Run `attempt` until it succeeds, a non-retryable error, or `max_retries` retries."""
        # The first try runs bare: most calls succeed, and backoff's bookkeeping costs
        # more than a create's own parsing. A failure is replayed as backoff's first try,
        # so waits, logging and the retry count are exactly backoff's.
        try:
            return await attempt()
        except KlingError as error:
            if not self.max_retries or not retry_if(error):
                raise
            first: KlingError | None = error

        tries = 1

        async def replay() -> T:
            nonlocal first, tries
            if first is not None:
                error, first = first, None
                raise error
            tries += 1
            token = _ATTEMPT.set(tries)  # for the log lines of this try
            try:
                return await attempt()
            finally:
                _ATTEMPT.reset(token)

        runner = self._runners.get(retry_if)
        if runner is None:
            runner = self._runners[retry_if] = self._make_runner(retry_if)
        result: T = await runner(replay, name)
        return result

    def _make_runner(
        self, retry_if: Callable[[BaseException], bool]
    ) -> Callable[[Callable[[], Awaitable[Any]], str], Awaitable[Any]]:
        # Decorating is not free (backoff inspects its handlers each time), so each
        # retry rule gets one decorated runner per transport, built on first use.
        @backoff.on_exception(
            cast("Callable[..., Generator[float, None, None]]", retry_waits),
            KlingError,
            max_tries=self.max_retries + 1,
            jitter=jitter,
            giveup=lambda error: not retry_if(error),
            on_backoff=_log_backoff,
            logger=None,
        )
        async def run(attempt: Callable[[], Awaitable[Any]], name: str) -> Any:
            return await attempt()

        return run

    async def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Any = None,
    ) -> Envelope:
        """One call with retries, for requests that are safe to repeat."""
        return await self.retrying(
            lambda: self.send(method, path, query=query, body=body), name=f"{method} {path}"
        )
