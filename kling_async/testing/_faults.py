"""Fault injection: the queue of injected faults, random fault rates, and how each is served."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import threading
from collections.abc import Sequence

from aiohttp import web

from ._models import FaultKind, FaultTarget
from ._wire import envelope

__all__ = [
    "PRE_FAULTS",
    "Fault",
    "FaultPlan",
    "connection_gone",
    "drop_connection",
    "hold",
    "interruptible_sleep",
    "parse_kind",
    "parse_target",
    "send_short_body",
    "serve_api_fault",
    "serve_files_fault",
]

PRE_FAULTS = frozenset(
    {
        FaultKind.SERVER_ERROR,
        FaultKind.SERVICE_UNAVAILABLE,
        FaultKind.GATEWAY_TIMEOUT,
        FaultKind.RATE_LIMITED,
        FaultKind.DROP_BEFORE,
    }
)
"""Faults answered before the request is processed (a create creates no task)."""

_SERVER_CODES = {
    FaultKind.SERVER_ERROR: (500, 5000),
    FaultKind.SERVICE_UNAVAILABLE: (503, 5001),
    FaultKind.GATEWAY_TIMEOUT: (504, 5002),
}

PROXY_PAGE = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)


def parse_kind(kind: str) -> FaultKind:
    """Turn a fault kind (member or string value) into a `FaultKind`, else `ValueError`."""
    try:
        return FaultKind(kind)
    except ValueError:
        allowed = ", ".join(repr(k.value) for k in FaultKind)
        raise ValueError(f"unknown fault kind {kind!r}; expected one of {allowed}") from None


def parse_target(on: str) -> FaultTarget:
    """Turn a fault target (member or string value) into a `FaultTarget`, else `ValueError`."""
    try:
        return FaultTarget(on)
    except ValueError:
        allowed = ", ".join(repr(t.value) for t in FaultTarget)
        raise ValueError(f"unknown fault target {on!r}; expected one of {allowed}") from None


@dataclasses.dataclass(frozen=True, slots=True)
class Fault:
    """A fault to apply to one request."""

    kind: FaultKind
    retry_after: float | None = None
    delay: float = 2.0


@dataclasses.dataclass(slots=True)
class _Injection:
    fault: Fault
    on: FaultTarget
    remaining: int


@dataclasses.dataclass(frozen=True, slots=True)
class _Rate:
    rate: float
    kinds: tuple[FaultKind, ...]
    retry_after: float | None
    delay: float


class FaultPlan:
    """Injected faults (first in, first out) and random fault rates per target."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._queue: list[_Injection] = []
        self._rates: dict[FaultTarget, _Rate] = {}
        self._lock = threading.Lock()

    def inject(
        self, kind: str, *, on: str, times: int, retry_after: float | None, delay: float
    ) -> None:
        """Queue `kind` for the next `times` requests matching `on`."""
        fault_kind, target = parse_kind(kind), parse_target(on)
        if times < 1:
            raise ValueError("times must be at least 1")
        _check_timing(retry_after, delay)
        with self._lock:
            self._queue.append(_Injection(Fault(fault_kind, retry_after, delay), target, times))

    def set_rate(
        self,
        rate: float,
        *,
        on: str,
        kinds: Sequence[str],
        retry_after: float | None,
        delay: float,
    ) -> None:
        """Make a fraction `rate` of requests matching `on` fail with a random kind of `kinds`."""
        target = parse_target(on)
        if not 0.0 <= rate <= 1.0:
            raise ValueError("rate must be in [0, 1]")
        parsed = tuple(parse_kind(k) for k in kinds)
        if rate > 0 and not parsed:
            raise ValueError("kinds must not be empty")
        _check_timing(retry_after, delay)
        with self._lock:
            if rate == 0:
                self._rates.pop(target, None)
            else:
                self._rates[target] = _Rate(rate, parsed, retry_after, delay)

    def clear(self) -> None:
        """Forget every injected fault and random rate."""
        with self._lock:
            self._queue.clear()
            self._rates.clear()

    @property
    def pending(self) -> int:
        """How many injected fault requests are still queued."""
        with self._lock:
            return sum(injection.remaining for injection in self._queue)

    def take(self, target: FaultTarget) -> Fault | None:
        """The fault for the next request to `target`, if any (consumes an injected one)."""
        with self._lock:
            for index, injection in enumerate(self._queue):
                if injection.on is target or injection.on is FaultTarget.ANY:
                    injection.remaining -= 1
                    if injection.remaining <= 0:
                        del self._queue[index]
                    return injection.fault
            if not self._rates:
                return None
            rate = self._rates.get(target) or self._rates.get(FaultTarget.ANY)
            if rate is None or self._rng.random() >= rate.rate:
                return None
            return Fault(self._rng.choice(rate.kinds), rate.retry_after, rate.delay)


def _check_timing(retry_after: float | None, delay: float) -> None:
    if retry_after is not None and retry_after < 0:
        raise ValueError("retry_after must not be negative")
    if delay < 0:
        raise ValueError("delay must not be negative")


def _retry_after_headers(fault: Fault) -> dict[str, str] | None:
    if fault.retry_after is None:
        return None
    return {"Retry-After": f"{fault.retry_after:g}"}


async def drop_connection(request: web.BaseRequest) -> web.StreamResponse:
    """Close the connection without answering; return the response aiohttp fails to send.

    Writing to the closed transport raises a `ConnectionError` inside aiohttp, which it
    treats as a client disconnect: nothing is logged and nothing reaches the client.
    """
    transport = request.transport
    if transport is not None:
        transport.close()
    response = web.Response(status=500)
    response.force_close()
    return response


async def send_short_body(
    request: web.BaseRequest,
    body: bytes,
    *,
    status: int,
    content_type: str,
    headers: dict[str, str] | None = None,
) -> web.StreamResponse:
    """Announce `len(body)` in `Content-Length`, send half of it, then close the connection."""
    response = web.StreamResponse(status=status, headers=headers)
    response.content_type = content_type
    response.content_length = len(body)
    response.force_close()
    try:
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
    except ConnectionError:
        return response
    transport = request.transport
    if transport is not None:
        transport.close()
    return response


async def send_unframed_body(
    request: web.BaseRequest, body: bytes, *, status: int, content_type: str
) -> web.StreamResponse:
    """Send half of `body` with neither `Content-Length` nor chunked encoding, then close.

    HTTP/1.1 lets such a body end where the connection ends (RFC 9112, 6.3), so the
    client cannot tell the cut from the end of the file: only the file itself can.
    """
    transport = request.transport
    if transport is not None:
        head = (
            f"HTTP/1.1 {status} OK\r\nContent-Type: {content_type}\r\nConnection: close\r\n\r\n"
        ).encode()
        transport.write(head + body[: len(body) // 2])
    return await drop_connection(request)


def connection_gone(request: web.BaseRequest) -> bool:
    """Whether the client has closed (or lost) the request's connection.

    asyncio closes the transport as soon as it reads the peer's end of stream, so this
    turns true within the loop iteration that sees the client go.
    """
    transport = request.transport
    return transport is None or transport.is_closing()


_WATCH_INTERVAL = 0.01
"""Seconds between two looks at the connection (and at `closing`) while a delay runs."""


async def interruptible_sleep(
    delay: float, closing: asyncio.Event | None, request: web.BaseRequest
) -> None:
    """Sleep `delay` seconds, or less if `closing` gets set or the client goes away.

    Polled (every 10 ms) rather than woken: aiohttp offers a handler no connection-lost
    signal short of cancelling it (`handler_cancellation`), which would also cancel the
    simulator's own drop faults mid-way.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + delay
    while True:
        if (closing is not None and closing.is_set()) or connection_gone(request):
            return
        left = deadline - loop.time()
        if left <= 0:
            return
        await asyncio.sleep(min(left, _WATCH_INTERVAL))


async def hold(delay: float, closing: asyncio.Event | None) -> bool:
    """Sleep `delay` seconds whether or not the client stays; `False` if `closing` got set
    first (at once when it already is), else `True`.

    A queueing gateway's hold: unlike `interruptible_sleep` it outlives the client.
    """
    if closing is None:
        await asyncio.sleep(delay)
        return True
    if closing.is_set():
        return False
    try:
        await asyncio.wait_for(closing.wait(), delay)
    except asyncio.TimeoutError:
        return True
    return False


async def serve_api_fault(
    request: web.BaseRequest,
    fault: Fault,
    answer: web.Response | None,
    closing: asyncio.Event | None,
) -> web.StreamResponse:
    """Serve `fault` on the API; `answer` is the normal answer (`None` for faults before it)."""
    kind = fault.kind
    if kind in _SERVER_CODES:
        status, code = _SERVER_CODES[kind]
        return envelope(code, status=status)
    if kind is FaultKind.RATE_LIMITED:
        return envelope(1302, headers=_retry_after_headers(fault))
    if kind in (FaultKind.DROP_BEFORE, FaultKind.DROP_AFTER):
        return await drop_connection(request)
    if answer is None:  # not reached: the faults above are the only ones served early
        return await drop_connection(request)
    if kind in (FaultKind.SLOW, FaultKind.HOLD):  # the handlers serve HOLD themselves
        await interruptible_sleep(fault.delay, closing, request)
        return answer
    if kind is FaultKind.HTML:
        return web.Response(body=PROXY_PAGE, status=200, content_type="text/html")
    if kind is FaultKind.EMPTY_DATA:
        return envelope(0, data=None)
    body = answer.body if isinstance(answer.body, bytes) else b""
    if kind is FaultKind.TRUNCATED:
        return web.Response(body=body[: len(body) // 2], content_type="application/json")
    return await send_short_body(
        request, body, status=answer.status, content_type="application/json"
    )


async def serve_files_fault(
    request: web.BaseRequest, fault: Fault, closing: asyncio.Event | None
) -> web.StreamResponse | None:
    """Serve `fault` on the files server; `None` means "serve the file" (after any delay).

    `SHORT_BODY` and `TRUNCATED` are applied by the file handler itself.
    """
    kind = fault.kind
    if kind in _SERVER_CODES:
        status, _ = _SERVER_CODES[kind]
        return web.Response(status=status, text=f"{status} error\n")
    if kind is FaultKind.RATE_LIMITED:
        return web.Response(
            status=429, text="429 Too Many Requests\n", headers=_retry_after_headers(fault)
        )
    if kind in (FaultKind.DROP_BEFORE, FaultKind.DROP_AFTER):
        return await drop_connection(request)
    if kind in (FaultKind.SLOW, FaultKind.HOLD):
        await interruptible_sleep(fault.delay, closing, request)
        return None
    if kind is FaultKind.HTML:
        return web.Response(body=PROXY_PAGE, status=200, content_type="text/html")
    if kind is FaultKind.EMPTY_DATA:
        return web.Response(body=b"", status=200, content_type="video/mp4")
    return None
