"""The `Simulator` facade: configuration, state, counters and the controls tests use.

Its handlers are in `_handlers.py`, the serving machinery in `_runner.py`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import time
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal, TypeVar

import aiohttp
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from ._auth import Authenticator
from ._callbacks import CallbackDispatcher
from ._clock import Clock, ManualClock
from ._faults import FaultPlan
from ._handlers import Handlers
from ._models import (
    ALL_FAULT_KINDS,
    TERMINAL_STATUSES,
    CallbackDelivery,
    Counters,
    LiveCounters,
    RecordedRequest,
    SimTask,
    SimVideo,
)
from ._packs import PackLedger, SimPack
from ._runner import call_on_loop, run_in_thread, serve_app, serve_until_signalled, url_host
from ._state import SavedState, read_state, write_state
from ._store import TaskStore

__all__ = ["Simulator"]

_T = TypeVar("_T")

_RECENT_SIZE = 1000


class Simulator:
    """An in-process simulator of Kling's video-extend API, served on real local sockets.

    Serves the API (`base_url`) and the result files (`files_base_url`, a second port
    standing for the CDN) with `aiohttp.web`. Task status is computed from timestamps when
    read, so any number of tasks costs no timers (except tasks with a `callback_url`).
    Every task time is read from `clock`: pass a `ManualClock` to move time in a test
    instead of waiting for it.

    Use it as `async with Simulator() as sim: ...`, with explicit `start()`/`close()`, or
    from synchronous code with `with Simulator().run_in_thread() as sim: ...`.

    Args:
        api_key: bearer key accepted as-is (gateway style); `None` disables key auth.
        access_key: JWT `iss` accepted (official style); `None` disables JWT auth.
        secret_key: HS256 secret JWTs must be signed with.
        prefix: path prefix of `base_url`: `""` (official) or e.g. `"/kling"` (gateway).
            The routes answer under `""` and `"/kling"` whatever this is.
        submit_time: seconds a task stays `submitted`.
        processing_time: further seconds it stays `processing` before finishing.
        failure_rate: fraction of tasks that end `failed`.
        running_limit: most unfinished tasks the account may have; a create past it
            answers HTTP 429 code 1303.
        credit: number of tasks the account may create; later creates answer 429 code 1102.
        seed: seed for failures, durations, ids and random faults.
        webhook_secret: a `whsec_...` secret; callbacks are then signed (standardwebhooks).
        host: interface to listen on.
        port: API port (0 picks a free one).
        file_size: pad each served result file to this many bytes (with an MP4 ``free``
            box); 0, or less than the video itself, serves the video alone. Result files
            are real, playable MP4s of a few KB (H.264, 32x32), a different one per video.
        files_port: files server port (0 picks a free one).
        latency: seconds every API answer takes at least (with 0 the handler still yields
            to the event loop once, so concurrent requests overlap as on a real server).
            Like a `"slow"` fault's delay, it is real time, whatever the `clock`.
        clock: a zero-argument callable giving Unix time in seconds, read for every task
            time (created, processing, finished, the ms timestamps it answers, callbacks
            coming due) and for JWT expiry; default `time.time`. A `ManualClock` also
            delivers due callbacks as soon as it is moved.
        time_spread: a fraction in [0, 1): each task's submit and processing times are
            drawn (seeded) uniformly from t * (1 - spread) to t * (1 + spread), as Kling's
            tasks take varied times. The default 0 gives every task the same times.
        state_path: a file to remember the account in across runs: tasks, videos, ids,
            external ids, the task count (for `credit`) and the ports last listened on.
            Read at `start` (a missing file is an empty account), written atomically after
            every create and `finish_task` and at `close`. With `port=0` (or
            `files_port=0`) the saved port is tried first, so `base_url` stays the same
            across runs while it is free. Task times are stored as absolute clock times,
            so a task finishes on time across a restart. `counters` count the current run,
            except `creates_by_external_id` (and `duplicate_external_ids`), which start
            from the remembered tasks.
        refuse_duplicate_external_ids: when true, a create whose `external_task_id`
            already names a task is answered HTTP 400, code 1201, message
            `"external_task_id already exists"`, and creates nothing (as Kling's newer API
            does; counted in `counters.rejected_duplicates`). It is checked once the body
            is found valid, after the `credit` and `running_limit` checks. Default false:
            every create makes a task, and `counters.duplicate_external_ids` shows which
            ids got more than one.
        resource_packs: the account's resource packs (`SimPack`), served by
            ``GET /account/costs`` (at the root only: a gateway-style `prefix` does not
            offer it) and drawn down by one unit per task that succeeds, from the usable
            pack that expires first. With packs given, a create when none is usable
            (online, not run out) answers 429, code 1102. `None` (the default): the
            costs query answers no packs and creates are not billed. With `state_path`,
            the packs start from what is given here, less every succeeded task remembered.

    Attributes:
        submit_time: see Args (changes apply to tasks created afterwards).
        processing_time: see Args (changes apply to tasks created afterwards).
        time_spread: see Args (changes apply to tasks created afterwards).
        failure_rate: see Args.
        running_limit: see Args (may be changed at any time).
        credit: see Args (may be changed at any time; counts every task ever created).
        file_size: see Args.
        latency: see Args (may be changed at any time).
        drop_callbacks: when true, callbacks are silently not sent (lost callbacks).
        refuse_duplicate_external_ids: see Args (may be changed at any time).
        counters: what the simulator has seen.
        clock: see Args.

    Raises:
        ValueError: at `start`, when `state_path` exists but cannot be read, is damaged or
            has another version (the file is left as it is).
    """

    def __init__(
        self,
        *,
        api_key: str | None = "sim-api-key",
        access_key: str | None = "sim-access-key",
        secret_key: str | None = "sim-secret-key",  # noqa: S107 - a simulator's fake key
        prefix: str = "",
        submit_time: float = 0.05,
        processing_time: float = 0.2,
        failure_rate: float = 0.0,
        running_limit: int | None = None,
        credit: int | None = None,
        seed: int | None = None,
        webhook_secret: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        file_size: int = 0,
        files_port: int = 0,
        latency: float = 0.0,
        clock: Clock | None = None,
        time_spread: float = 0.0,
        state_path: str | os.PathLike[str] | None = None,
        refuse_duplicate_external_ids: bool = False,
        resource_packs: Sequence[SimPack] | None = None,
    ) -> None:
        if prefix and (not prefix.startswith("/") or prefix.endswith("/")):
            raise ValueError("prefix must be '' or start with '/' and not end with '/'")
        if submit_time < 0 or processing_time < 0:
            raise ValueError("submit_time and processing_time must not be negative")
        if not 0.0 <= failure_rate <= 1.0:
            raise ValueError("failure_rate must be in [0, 1]")
        if not 0.0 <= time_spread < 1.0:
            raise ValueError("time_spread must be in [0, 1)")
        if latency < 0:
            raise ValueError("latency must not be negative")
        if file_size < 0:
            raise ValueError("file_size must not be negative")
        if (access_key is None) != (secret_key is None):
            raise ValueError("access_key and secret_key go together")
        self.clock: Clock = time.time if clock is None else clock
        self._auth = Authenticator(
            api_key=api_key, access_key=access_key, secret_key=secret_key, clock=self._clock
        )
        self._prefix = prefix
        self._host = host
        self._port = port
        self._files_port_requested = files_port
        self._webhook = Webhook(webhook_secret) if webhook_secret is not None else None
        self._state_path = None if state_path is None else Path(state_path)
        self.submit_time = submit_time
        self.processing_time = processing_time
        self.time_spread = time_spread
        self.failure_rate = failure_rate
        self.running_limit = running_limit
        self.credit = credit
        self.file_size = file_size
        self.latency = latency
        self.drop_callbacks = False
        self.refuse_duplicate_external_ids = refuse_duplicate_external_ids
        self.counters: Counters = LiveCounters(self._running_now)
        self._packs = (
            None if resource_packs is None else PackLedger(list(resource_packs), self._clock())
        )

        self._store = TaskStore(seed=seed, video_url=self.video_url, clock=self._clock)
        fault_seed = None if seed is None else f"kling-sim-faults-{seed}"
        self._faults = FaultPlan(random.Random(fault_seed))
        self._recent: collections.deque[RecordedRequest] = collections.deque(maxlen=_RECENT_SIZE)
        self._handlers = Handlers(
            settings=self,
            store=self._store,
            faults=self._faults,
            auth=self._auth,
            clock=self._clock,
            recent=self._recent,
            closing=lambda: self._closing,
            on_request=self._deliver_due,
            on_created=self._on_created,
            packs=self._packs,
        )

        self._state: Literal["new", "starting", "started", "closing", "closed"] = "new"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing: asyncio.Event | None = None
        self._api_runner: web.AppRunner | None = None
        self._files_runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._callbacks: CallbackDispatcher | None = None
        self._api_port: int | None = None
        self._files_port: int | None = None
        self._unwatch: Callable[[], None] | None = None
        self._may_save = False  # true once the state file was read (never clobber a bad one)

    def __repr__(self) -> str:
        where = self.base_url if self._api_port is not None else self._state
        return f"<Simulator {where} tasks={len(self._store.tasks)}>"

    def _clock(self) -> float:
        return self.clock()

    # -- configuration, read-only ---------------------------------------------------------

    @property
    def api_key(self) -> str | None:
        """The accepted bearer key, or `None`."""
        return self._auth.api_key

    @property
    def access_key(self) -> str | None:
        """The accepted JWT issuer (`iss`), or `None`."""
        return self._auth.access_key

    @property
    def secret_key(self) -> str | None:
        """The HS256 secret of accepted JWTs, or `None`."""
        return self._auth.secret_key

    @property
    def prefix(self) -> str:
        """The path prefix of `base_url`."""
        return self._prefix

    @property
    def state_path(self) -> Path | None:
        """The state file, or `None`."""
        return self._state_path

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start listening (API and files servers) on the current event loop.

        Raises:
            RuntimeError: when already started (a simulator starts once).
            ValueError: when `state_path` cannot be loaded.
        """
        if self._state != "new":
            raise RuntimeError("a Simulator can only be started once")
        self._state = "starting"
        self._loop = asyncio.get_running_loop()
        self._closing = asyncio.Event()
        try:
            saved = read_state(self._state_path) if self._state_path is not None else None
            # The files server first: the loaded videos' URLs name its port.
            self._files_runner, self._files_port = await serve_app(
                self._handlers.files_app(),
                self._host,
                self._files_port_requested,
                preferred=saved.files_port if saved is not None else None,
            )
            if saved is not None:
                self._restore(saved)
                counters = self.counters
                counters.peak_running_tasks = max(
                    counters.peak_running_tasks, self._store.running(self._clock())
                )
            self._may_save = self._state_path is not None
            self._api_runner, self._api_port = await serve_app(
                self._handlers.api_app(self._prefix),
                self._host,
                self._port,
                preferred=saved.api_port if saved is not None else None,
            )
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
            self._callbacks = CallbackDispatcher(
                loop=self._loop,
                session=self._session,
                counters=self.counters,
                webhook=self._webhook,
                should_drop=lambda: self.drop_callbacks,
                clock=self._clock,
            )
            if isinstance(self.clock, ManualClock):
                self._unwatch = self.clock.watch(self._on_clock_moved)
            self._save()
        except BaseException:
            await self._shutdown()
            self._state = "closed"
            raise
        self._state = "started"

    async def close(self) -> None:
        """Stop both servers, cancel pending callbacks, close the HTTP session, and save
        the state (with `state_path`).

        Slow (`"slow"` fault) answers in progress are cut short, and so are held creates
        (`"hold"` fault): they create no task and their connections are closed. Closing
        twice is fine.
        """
        if self._state in ("new", "closed"):
            self._state = "closed"
            return
        if self._state == "closing":
            return
        self._state = "closing"
        await self._shutdown()
        self._state = "closed"

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _shutdown(self) -> None:
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        if self._closing is not None:
            self._closing.set()
        await self._handlers.close()
        for runner in (self._api_runner, self._files_runner):
            if runner is not None:
                await runner.cleanup()
        if self._callbacks is not None:
            await self._callbacks.close()
        if self._session is not None:
            await self._session.close()
        self._save()
        self._may_save = False

    async def serve_until_signalled(
        self, announce: Callable[[Simulator], None] | None = None
    ) -> None:
        """Start, call `announce` with the running simulator, serve until SIGINT or
        SIGTERM, then close. For serving from a command line."""
        await serve_until_signalled(
            self.start, self.close, None if announce is None else lambda: announce(self)
        )

    @contextlib.contextmanager
    def run_in_thread(self) -> Iterator[Simulator]:
        """Run the simulator on its own event loop in a daemon thread while in the block.

        For synchronous code and any async framework: the block gets the started
        simulator; on exit it is closed and the thread ends. Methods such as
        `finish_task` are safe to call from the block's thread.

        Raises:
            RuntimeError: when already started.
        """
        if self._state != "new":
            raise RuntimeError("a Simulator can only be started once")
        with run_in_thread(self.start, self.close):
            yield self

    def _on_loop(self, fn: Callable[[], _T]) -> _T:
        """Run `fn` on the simulator's loop (from any thread) and return its result."""
        return call_on_loop(self._loop, fn)

    # -- where it listens -----------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """`http://<host>:<port><prefix>`, the API's base URL.

        Raises:
            RuntimeError: when not started.
        """
        if self._api_port is None:
            raise RuntimeError("the Simulator is not started")
        return f"http://{url_host(self._host)}:{self._api_port}{self._prefix}"

    @property
    def files_base_url(self) -> str:
        """`http://<host>:<files port>`, the origin result video URLs point to.

        Raises:
            RuntimeError: when not started.
        """
        if self._files_port is None:
            raise RuntimeError("the Simulator is not started")
        return f"http://{url_host(self._host)}:{self._files_port}"

    @property
    def port(self) -> int:
        """The API server's port (after `start`)."""
        if self._api_port is None:
            raise RuntimeError("the Simulator is not started")
        return self._api_port

    @property
    def files_port(self) -> int:
        """The files server's port (after `start`)."""
        if self._files_port is None:
            raise RuntimeError("the Simulator is not started")
        return self._files_port

    def video_url(self, video_id: str) -> str:
        """The URL the files server serves `video_id` at."""
        return f"{self.files_base_url}/files/{video_id}.mp4"

    # -- state ----------------------------------------------------------------------------

    @property
    def tasks(self) -> Mapping[str, SimTask]:
        """Every task created, by task id, oldest first (read-only view)."""
        return types.MappingProxyType(self._store.tasks)

    @property
    def videos(self) -> Mapping[str, SimVideo]:
        """Every video known (parents and results), by video id (read-only view)."""
        return types.MappingProxyType(self._store.videos)

    @property
    def recent_requests(self) -> Sequence[RecordedRequest]:
        """The last 1000 requests to either server, oldest first (a snapshot)."""
        return tuple(self._recent)

    @property
    def recent_callbacks(self) -> Sequence[CallbackDelivery]:
        """The last 1000 callback deliveries attempted, oldest first (a snapshot)."""
        return tuple(self._callbacks.log) if self._callbacks is not None else ()

    @property
    def running_tasks(self) -> int:
        """Tasks not finished now (what `running_limit` is compared with)."""
        return self._on_loop(lambda: self._store.running(self._clock()))

    def _running_now(self) -> int:
        return self._on_loop(lambda: self._store.running(self._clock()))

    @property
    def pending_faults(self) -> int:
        """Requests still to be faulted by `inject`."""
        return self._faults.pending

    def task_by_external_id(self, external_task_id: str) -> SimTask | None:
        """The newest task created with `external_task_id`, if any."""
        return self._store.by_external.get(external_task_id)

    # -- control --------------------------------------------------------------------------

    def inject(
        self,
        kind: str,
        *,
        on: str = "create",
        times: int = 1,
        retry_after: float | None = None,
        delay: float = 2.0,
    ) -> None:
        """Fault the next `times` requests matching `on` (faults queue first in, first out).

        Args:
            kind: a `FaultKind` (or its value: `"500"`, `"503"`, `"504"`, `"429"`,
                `"drop_before"`, `"drop_after"`, `"slow"`, `"html"`, `"truncated"`,
                `"short_body"`, `"hold"`, `"empty_data"`).
            on: `"create"`, `"get"`, `"list"`, `"files"` or `"any"`.
            times: how many requests get it.
            retry_after: seconds for the `Retry-After` header of `"429"` (written with `%g`,
                so fractions such as `0.2` stay fractions).
            delay: seconds a `"slow"` answer is held back, and a `"hold"` request held
                (real time, whatever the `clock`).

        Raises:
            ValueError: for an unknown kind or target, or a bad number.
        """
        self._faults.inject(kind, on=on, times=times, retry_after=retry_after, delay=delay)

    def set_fault_rate(
        self,
        rate: float,
        *,
        on: str = "create",
        kinds: Sequence[str] = ALL_FAULT_KINDS,
        retry_after: float | None = None,
        delay: float = 2.0,
    ) -> None:
        """Fault a random fraction `rate` of the requests matching `on` (seeded).

        Each faulted request gets a kind drawn from `kinds` (by default every kind but
        `"hold"` and `"empty_data"`, see `ALL_FAULT_KINDS`). Injected faults take
        precedence. A rate set for `on` replaces the previous one; `rate=0` removes it;
        a rate for `"any"` applies to targets without their own.
        """
        self._faults.set_rate(rate, on=on, kinds=kinds, retry_after=retry_after, delay=delay)

    def clear_faults(self) -> None:
        """Forget every injected fault and random fault rate."""
        self._faults.clear()

    def finish_task(self, task_id: str, *, status: str = "succeed") -> None:
        """Make a task terminal now (`"succeed"` or `"failed"`), sending its callback.

        Args:
            task_id: task id or external task id.
            status: the terminal status.

        Raises:
            KeyError: for an unknown task.
            ValueError: for another status, or when the task already finished differently.
        """
        if status not in TERMINAL_STATUSES:
            raise ValueError("status must be 'succeed' or 'failed'")
        self._on_loop(lambda: self._finish(task_id, status))

    def expire_tokens(self) -> None:
        """Answer 401/1004 from now on to every JWT signed before this call.

        A token counts as signed at its `iat`, else `nbf + 5`, else `exp - 1800` (whole
        seconds, as clients write them). Tokens already seen are rejected even if signed
        this very second; an unseen one signed this second is accepted. Note that a token
        re-signed within the same second with the same claims is the very same string, so
        it stays rejected: let the clock tick over (or add `iat`/`jti`) before re-signing.
        """
        self._on_loop(self._auth.expire_tokens)

    def _finish(self, task_id: str, status: str) -> None:
        task = self._store.finish(task_id, status, self._clock())
        if task is None:
            return
        if self._packs is not None:
            self._packs.track(task)
        if self._callbacks is not None:
            self._callbacks.finish(task)
        self._save()

    # -- hooks of the handlers, the clock and the state file ------------------------------

    def _on_created(self, task: SimTask) -> None:
        if self._packs is not None:
            self._packs.track(task)
        if task.callback_url is not None and self._callbacks is not None:
            self._callbacks.schedule(task)
        self._save()

    def _deliver_due(self) -> None:
        if self._callbacks is not None:
            self._callbacks.deliver_due()

    def _on_clock_moved(self) -> None:
        """A `ManualClock` moved (on any thread): deliver the callbacks now due."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._deliver_due)

    def _restore(self, saved: SavedState) -> None:
        path = self._state_path
        try:
            self._store.load(saved.store, self._clock())
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"the simulator state file {str(path)!r} is damaged: {exc!r:.200}"
            ) from exc
        by_external = self.counters.creates_by_external_id
        for task in self._store.order:
            if self._packs is not None:
                self._packs.track(task)
            if task.external_task_id is not None:
                by_external[task.external_task_id] = by_external.get(task.external_task_id, 0) + 1

    def _save(self) -> None:
        if not self._may_save or self._state_path is None:
            return
        state = SavedState(self._store.dump(), self._api_port, self._files_port)
        write_state(self._state_path, state)
