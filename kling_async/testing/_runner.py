"""Serving the simulator: aiohttp runners on local ports, a thread of its own, signals."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import signal
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

from aiohttp import web

__all__ = ["call_on_loop", "run_in_thread", "serve_app", "serve_until_signalled", "url_host"]

_T = TypeVar("_T")


async def serve_app(
    app: web.Application, host: str, port: int, *, preferred: int | None = None
) -> tuple[web.AppRunner, int]:
    """Serve `app` on `host:port` and return its runner and the port it listens on.

    With `port=0` and a `preferred` port, that port is tried first and a free one is
    taken when it is in use (so a restarted simulator keeps its URL when it can).
    """
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    try:
        if port == 0 and preferred:
            try:
                await web.TCPSite(runner, host, preferred).start()
            except OSError:  # taken by now: any free port will do
                await web.TCPSite(runner, host, 0).start()
        else:
            await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, int(runner.addresses[0][1])


def url_host(host: str) -> str:
    """The host part of a URL that reaches a server listening on `host`."""
    if host in ("", "0.0.0.0"):  # noqa: S104 - mapping the wildcard to loopback
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


async def serve_until_signalled(
    start: Callable[[], Awaitable[None]],
    close: Callable[[], Awaitable[None]],
    announce: Callable[[], None] | None = None,
) -> None:
    """Start, call `announce`, serve until SIGINT or SIGTERM, then close."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, stop.set)
    await start()
    try:
        if announce is not None:
            announce()
        await stop.wait()
    finally:
        await close()


@contextlib.contextmanager
def run_in_thread(
    start: Callable[[], Coroutine[Any, Any, None]], close: Callable[[], Coroutine[Any, Any, None]]
) -> Iterator[None]:
    """Run `start()` on a new event loop in a daemon thread; `close()` it on exit.

    Start errors are raised in the caller's thread; the thread ends with the block.
    """
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    failure: list[BaseException] = []

    def serve() -> None:
        asyncio.set_event_loop(loop)
        try:
            try:
                loop.run_until_complete(start())
            except BaseException as exc:
                failure.append(exc)
                return
            finally:
                ready.set()
            loop.run_forever()
        finally:
            try:
                _cancel_all_tasks(loop)
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                asyncio.set_event_loop(None)
                loop.close()

    thread = threading.Thread(target=serve, name="kling-simulator", daemon=True)
    thread.start()
    ready.wait()
    if failure:
        thread.join()
        raise failure[0]
    try:
        yield
    finally:
        try:
            asyncio.run_coroutine_threadsafe(close(), loop).result()
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()


def call_on_loop(loop: asyncio.AbstractEventLoop | None, fn: Callable[[], _T]) -> _T:
    """Run `fn` on `loop` (from any thread) and return its result.

    Runs it right here when `loop` is not running or is the current thread's loop.
    """
    if loop is None or loop.is_closed() or not loop.is_running():
        return fn()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        return fn()
    future: concurrent.futures.Future[_T] = concurrent.futures.Future()

    def call() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    loop.call_soon_threadsafe(call)
    return future.result()


def _cancel_all_tasks(loop: asyncio.AbstractEventLoop) -> None:
    pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
