"""`SyncKlingClient`: the async client's methods without ``await``, on a loop in a thread it owns.

One implementation of every behaviour: each call is a coroutine of the wrapped
`KlingClient`, run on the facade's own event loop in a (non-daemon) thread, while the
calling thread waits for its outcome. So it works from a plain script, from many threads
at once, and where the calling thread already runs a loop (a Jupyter cell).

A Ctrl-C in the calling thread cancels the coroutine it was waiting for, waits for that
cancellation to finish (connections closed, in-flight batch items cancelled), logs which
Kling tasks go on regardless (Kling has no cancel call), and re-raises.

Closing joins the thread: `close()`, leaving ``with``, the interpreter's exit (before it
joins threads) and garbage collection all close the client on its loop first, so no
session is left open and nothing dies mid-write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import weakref
from collections.abc import (
    AsyncGenerator,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Sequence,
)
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, TypeVar

from kling_async._client import KlingClient
from kling_async._models import BatchResult, ExtendRequest, ResourcePack, Task, Video
from kling_async._types import OnDownloadProgress, OnProgress, OnUpdate
from kling_async.errors import ConfigurationError

if TYPE_CHECKING:
    from datetime import datetime

    from typing_extensions import Self

T = TypeVar("T")

logger = logging.getLogger("kling_async")

_CLOSED = "this SyncKlingClient is closed; create a new one"


#: How often a caller waiting for the facade's loop lets pending signal handlers run.
_WAKE: Final = 0.1


def _serve(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
    """The facade's thread: run its loop until stopped, then end what is left and close it."""
    if hasattr(signal, "pthread_sigmask"):
        # The kernel hands a process's SIGINT to any thread that does not block it; one
        # taken by this thread (or the threads it starts, which inherit the mask) would
        # not wake the caller blocked in `_run`, so Ctrl-C would go unnoticed.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    asyncio.set_event_loop(loop)
    loop.call_soon(ready.set)
    try:
        loop.run_forever()
    finally:
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def _shut_down(
    loop: asyncio.AbstractEventLoop, thread: threading.Thread, client: KlingClient
) -> None:
    """Close `client` on `loop`, stop the loop and join its thread (from any other thread)."""
    if loop.is_closed() or not thread.is_alive():
        return
    if threading.current_thread() is thread:  # collected inside a hook: stop, don't wait
        loop.create_task(client.aclose()).add_done_callback(lambda _: loop.stop())
        return
    with contextlib.suppress(RuntimeError):  # the loop stopped meanwhile
        asyncio.run_coroutine_threadsafe(client.aclose(), loop).result()
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(loop.stop)
    thread.join()


#: The finalizers of the facades not closed yet.
_OPEN: set[weakref.finalize[Any, Any]] = set()


def _close_all() -> None:
    for finalizer in list(_OPEN):
        finalizer()
    _OPEN.clear()


# The interpreter joins non-daemon threads before it runs `atexit` functions: an unclosed
# facade's thread would keep it waiting forever. threading's own early hook (what
# concurrent.futures uses) closes them first.
_register_atexit = getattr(threading, "_register_atexit", None)
if _register_atexit is not None:
    _register_atexit(_close_all)


class SyncKlingClient:
    """The client for scripts, notebooks and threaded code: `KlingClient` without ``await``.

    Takes `KlingClient`'s arguments (but `session`). Use it as
    ``with SyncKlingClient() as kling: task = kling.extend_and_wait(request)`` or close
    it with `close()`. Safe to share between threads. Inside async code, use
    `KlingClient` itself: each call here blocks the calling thread until it is done.

    Hooks (`on_update`, `on_progress`) run in the client's own thread; they must not call
    the facade (that would wait for itself). Ctrl-C cancels the call it interrupts,
    logs (``kling_async`` logger, warning) which tasks go on at Kling, and re-raises
    `KeyboardInterrupt`.

    Raises:
        ConfigurationError: as `KlingClient`, or when `session` is given.
    """

    def __init__(self, **options: Any) -> None:
        if "session" in options:
            raise ConfigurationError(
                "SyncKlingClient makes its own session on its own event loop: session= "
                "is not accepted (use KlingClient to bring a session)"
            )
        self._client = KlingClient(**options)
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(
            target=_serve, args=(self._loop, ready), name="kling-async-sync", daemon=False
        )
        self._thread.start()
        ready.wait()
        self._closed = False
        self._close_lock = threading.Lock()
        # Not closed by its owner: closed when collected, or when the interpreter exits
        # (before it joins non-daemon threads, which would otherwise wait forever).
        self._finalizer = weakref.finalize(self, _shut_down, self._loop, self._thread, self._client)
        _OPEN.add(self._finalizer)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        client = repr(self._client).removeprefix("<KlingClient ").removesuffix(">")
        return f"<SyncKlingClient {client.rsplit(' ', 1)[0]} {state}>"

    @property
    def base_url(self) -> str:
        """The API root."""
        return self._client.base_url

    @property
    def max_in_flight(self) -> int:
        """The most HTTP requests this client has open at once."""
        return self._client.max_in_flight

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> Self:
        self._check_open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the client and join its thread. Safe to repeat; final."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        _OPEN.discard(self._finalizer)
        self._finalizer()

    @property
    def closed(self) -> bool:
        """True once `close` was called."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(_CLOSED)
        if threading.current_thread() is self._thread:
            raise RuntimeError(
                "SyncKlingClient was called from one of its own hooks (on_update, "
                "on_progress), which run in its thread: it would wait for itself"
            )

    def _run(
        self, coroutine: Coroutine[Any, Any, T], going_on: Callable[[], Sequence[str]] = tuple
    ) -> T:
        """Run `coroutine` on the facade's loop and wait for it; Ctrl-C cancels it."""
        try:
            self._check_open()
        except RuntimeError:
            coroutine.close()
            raise
        done = threading.Event()
        started: list[asyncio.Task[T]] = []

        def start() -> None:
            task = self._loop.create_task(coroutine)
            task.add_done_callback(lambda _: done.set())
            started.append(task)

        def cancel() -> None:
            # Runs after `start` if that was queued (the loop's callbacks are first in,
            # first out); if the interrupt came before it was, nothing ever started.
            if started:
                started[0].cancel()
            else:
                coroutine.close()
                done.set()

        try:
            try:
                self._loop.call_soon_threadsafe(start)
            except RuntimeError:  # closed by another thread meanwhile
                coroutine.close()
                raise RuntimeError(_CLOSED) from None
            # In slices: a signal taken by another thread still gets its handler run here.
            while not done.wait(_WAKE):
                pass
        except KeyboardInterrupt as interrupt:
            # Wherever it lands (waiting, or still handing the call to the loop).
            self._loop.call_soon_threadsafe(cancel)
            done.wait()  # a second Ctrl-C stops waiting for the cancellation
            _report_interrupt(interrupt, going_on())
            raise
        return started[0].result()

    def _iterate(
        self,
        generator: AsyncGenerator[T, None],
        going_on: Callable[[], Sequence[str]] = tuple,
    ) -> Iterator[T]:
        """A plain iterator over an async generator run on the facade's loop.

        Leaving it early (``break``, an exception, `close()`) closes the async generator,
        which cancels whatever it still runs.
        """

        async def next_item() -> tuple[bool, T | None]:
            try:
                return True, await generator.__anext__()
            except StopAsyncIteration:
                return False, None

        finished = False
        try:
            while True:
                more, item = self._run(next_item(), going_on)
                if not more:
                    finished = True
                    return
                yield item  # type: ignore[misc]  # `more` is True: an item was produced
        finally:
            if not finished and not self._closed:
                with contextlib.suppress(RuntimeError):
                    self._run(generator.aclose())
                left = going_on()
                if left:
                    # Billed tasks the caller no longer watches (a `break`, an error, or a
                    # Ctrl-C that landed in the loop's body, between two items).
                    logger.warning(
                        "left the iteration early: %d task(s) go on at Kling: %s "
                        "(wait for one with wait_for_task(task_id))",
                        len(left),
                        ", ".join(left),
                    )

    # -- create ------------------------------------------------------------------------

    def extend(self, request: ExtendRequest) -> Task:
        """See `KlingClient.extend`."""
        return self._run(self._client.extend(request))

    def extend_video(
        self,
        video_id: str,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        cfg_scale: float | None = None,
        callback_url: str | None = None,
        external_task_id: str | None = None,
        watermark: bool | None = None,
        parent_task_id: str | None = None,
    ) -> Task:
        """See `KlingClient.extend_video`."""
        return self._run(
            self._client.extend_video(
                video_id,
                prompt,
                negative_prompt=negative_prompt,
                cfg_scale=cfg_scale,
                callback_url=callback_url,
                external_task_id=external_task_id,
                watermark=watermark,
                parent_task_id=parent_task_id,
            )
        )

    # -- read --------------------------------------------------------------------------

    def get_task(self, task_id: str | None = None, *, external_task_id: str | None = None) -> Task:
        """See `KlingClient.get_task`."""
        return self._run(self._client.get_task(task_id, external_task_id=external_task_id))

    def list_tasks(self, page: int = 1, page_size: int = 30) -> list[Task]:
        """See `KlingClient.list_tasks`."""
        return self._run(self._client.list_tasks(page, page_size))

    def iter_tasks(self, page_size: int = 100) -> Iterator[Task]:
        """Every task, page by page (a plain iterator; see `KlingClient.iter_tasks`)."""
        self._check_open()
        pages = self._client.iter_tasks(page_size)
        assert isinstance(pages, AsyncGenerator)
        return self._iterate(pages)

    def resource_packs(
        self, *, since: datetime | None = None, name: str | None = None
    ) -> list[ResourcePack]:
        """See `KlingClient.resource_packs`."""
        return self._run(self._client.resource_packs(since=since, name=name))

    # -- wait --------------------------------------------------------------------------

    def wait_for_task(
        self,
        task_or_id: Task | str,
        *,
        timeout: float = 900.0,
        on_update: OnUpdate | None = None,
    ) -> Task:
        """See `KlingClient.wait_for_task`; Ctrl-C stops waiting (the task goes on)."""
        task_id = task_or_id.task_id if isinstance(task_or_id, Task) else str(task_or_id)
        return self._run(
            self._client.wait_for_task(task_or_id, timeout=timeout, on_update=on_update),
            lambda: (task_id,),
        )

    def extend_and_wait(
        self,
        request: ExtendRequest,
        *,
        timeout: float = 900.0,
        on_update: OnUpdate | None = None,
    ) -> Task:
        """See `KlingClient.extend_and_wait`; Ctrl-C after the create leaves the task going."""
        seen: list[Task] = []

        async def record(task: Task) -> None:
            seen[:] = [task]
            if on_update is not None:
                result = on_update(task)
                if result is not None:
                    await result

        def going_on() -> Sequence[str]:
            return [task.task_id for task in seen if not task.is_terminal]

        return self._run(
            self._client.extend_and_wait(request, timeout=timeout, on_update=record), going_on
        )

    # -- on top ------------------------------------------------------------------------

    def extend_chain(
        self,
        video_id: str | Video,
        prompts: Sequence[str],
        *,
        parent_task_id: str | None = None,
        **options: Any,
    ) -> list[Task]:
        """See `KlingClient.extend_chain`."""
        return self._run(
            self._client.extend_chain(video_id, prompts, parent_task_id=parent_task_id, **options)
        )

    def extend_many(
        self,
        requests: Iterable[ExtendRequest],
        *,
        concurrency: int | None = None,
        wait: bool = True,
        journal: str | os.PathLike[str] | None = None,
        on_progress: OnProgress | None = None,
        on_update: Callable[[int, Task], object] | None = None,
    ) -> Iterator[BatchResult]:
        """Run many extensions; a plain iterator of `BatchResult` in completion order.

        As `KlingClient.extend_many`: the input is read lazily (in the client's thread),
        and leaving the ``for`` early (or Ctrl-C) cancels the items in flight; their
        Kling tasks go on (logged; with a `journal`, the same run again collects them).
        """
        self._check_open()
        running: dict[int, Task] = {}

        def record(index: int, task: Task) -> None:
            running[index] = task
            if on_update is not None:
                on_update(index, task)

        def going_on() -> Sequence[str]:
            return [task.task_id for task in list(running.values()) if not task.is_terminal]

        batch = self._client.extend_many(
            requests,
            concurrency=concurrency,
            wait=wait,
            journal=journal,
            on_progress=on_progress,
            on_update=record,
        )

        def results() -> Iterator[BatchResult]:
            for result in self._iterate(batch, going_on):
                running.pop(result.index, None)
                yield result

        return results()

    def download(
        self,
        task_or_video: Task | Video,
        dest: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        on_progress: OnDownloadProgress | None = None,
    ) -> Path:
        """See `KlingClient.download`; Ctrl-C leaves no partial file."""
        return self._run(
            self._client.download(task_or_video, dest, overwrite=overwrite, on_progress=on_progress)
        )


def _report_interrupt(interrupt: KeyboardInterrupt, going_on: Sequence[str]) -> None:
    """Say which Kling tasks an interrupted call leaves running (they cannot be cancelled)."""
    if going_on:
        text = (
            f"interrupted: the call was cancelled, but {len(going_on)} task(s) go on at "
            f"Kling: {', '.join(going_on)} (wait for one with wait_for_task(task_id))"
        )
    else:
        text = "interrupted: the call was cancelled; no task of it is known to go on"
    logger.warning(text)
    if sys.version_info >= (3, 11):
        interrupt.add_note(text)
