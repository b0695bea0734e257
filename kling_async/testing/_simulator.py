"""The in-process simulator of Kling's video-extend API (`Simulator`)."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import random
import signal
import threading
import time
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Literal, TypeVar

import aiohttp
import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict, CIMultiDictProxy
from standardwebhooks.webhooks import Webhook

from ._auth import Authenticator
from ._callbacks import CallbackDispatcher
from ._faults import PRE_FAULTS, Fault, FaultPlan, serve_api_fault, serve_files_fault
from ._files import serve_file
from ._models import (
    ALL_FAULT_KINDS,
    TERMINAL_STATUSES,
    CallbackDelivery,
    Counters,
    FaultKind,
    FaultTarget,
    RecordedRequest,
    SimTask,
    SimVideo,
)
from ._store import TaskStore
from ._wire import envelope, int_param, validate_create

__all__ = ["Simulator"]

_T = TypeVar("_T")

_PATH = "/v1/videos/video-extend"
_RECENT_SIZE = 1000


class Simulator:
    """An in-process simulator of Kling's video-extend API, served on real local sockets.

    Serves the API (`base_url`) and the result files (`files_base_url`, a second port
    standing for the CDN) with `aiohttp.web`. Task status is computed from timestamps when
    read, so any number of tasks costs no timers (except tasks with a `callback_url`).

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
        file_size: bytes of each served result file.
        files_port: files server port (0 picks a free one).
        latency: seconds every API answer takes at least (with 0 the handler still yields
            to the event loop once, so concurrent requests overlap as on a real server).

    Attributes:
        submit_time: see Args (changes apply to tasks created afterwards).
        processing_time: see Args (changes apply to tasks created afterwards).
        failure_rate: see Args.
        running_limit: see Args (may be changed at any time).
        credit: see Args (may be changed at any time; counts every task ever created).
        file_size: see Args.
        latency: see Args (may be changed at any time).
        drop_callbacks: when true, callbacks are silently not sent (lost callbacks).
        counters: what the simulator has seen.
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
        file_size: int = 256 * 1024,
        files_port: int = 0,
        latency: float = 0.0,
    ) -> None:
        if prefix and (not prefix.startswith("/") or prefix.endswith("/")):
            raise ValueError("prefix must be '' or start with '/' and not end with '/'")
        if submit_time < 0 or processing_time < 0:
            raise ValueError("submit_time and processing_time must not be negative")
        if not 0.0 <= failure_rate <= 1.0:
            raise ValueError("failure_rate must be in [0, 1]")
        if latency < 0:
            raise ValueError("latency must not be negative")
        if file_size < 0:
            raise ValueError("file_size must not be negative")
        if (access_key is None) != (secret_key is None):
            raise ValueError("access_key and secret_key go together")
        self._auth = Authenticator(api_key=api_key, access_key=access_key, secret_key=secret_key)
        self._prefix = prefix
        self._host = host
        self._port = port
        self._files_port_requested = files_port
        self._webhook = Webhook(webhook_secret) if webhook_secret is not None else None
        self.submit_time = submit_time
        self.processing_time = processing_time
        self.failure_rate = failure_rate
        self.running_limit = running_limit
        self.credit = credit
        self.file_size = file_size
        self.latency = latency
        self.drop_callbacks = False
        self.counters = Counters()

        self._store = TaskStore(seed=seed, video_url=self.video_url)
        fault_seed = None if seed is None else f"kling-sim-faults-{seed}"
        self._faults = FaultPlan(random.Random(fault_seed))
        self._recent: collections.deque[RecordedRequest] = collections.deque(maxlen=_RECENT_SIZE)

        self._state: Literal["new", "starting", "started", "closing", "closed"] = "new"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing: asyncio.Event | None = None
        self._api_runner: web.AppRunner | None = None
        self._files_runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._callbacks: CallbackDispatcher | None = None
        self._api_port: int | None = None
        self._files_port: int | None = None

    def __repr__(self) -> str:
        where = self.base_url if self._api_port is not None else self._state
        return f"<Simulator {where} tasks={len(self._store.tasks)}>"

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

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start listening (API and files servers) on the current event loop.

        Raises:
            RuntimeError: when already started (a simulator starts once).
        """
        if self._state != "new":
            raise RuntimeError("a Simulator can only be started once")
        self._state = "starting"
        self._loop = asyncio.get_running_loop()
        self._closing = asyncio.Event()
        try:
            self._api_runner, self._api_port = await self._serve(self._api_app(), self._port)
            self._files_runner, self._files_port = await self._serve(
                self._files_app(), self._files_port_requested
            )
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
            self._callbacks = CallbackDispatcher(
                loop=self._loop,
                session=self._session,
                counters=self.counters,
                webhook=self._webhook,
                should_drop=lambda: self.drop_callbacks,
            )
        except BaseException:
            await self._shutdown()
            self._state = "closed"
            raise
        self._state = "started"

    async def close(self) -> None:
        """Stop both servers, cancel pending callbacks and close the HTTP session.

        Slow (`"slow"` fault) answers in progress are cut short. Closing twice is fine.
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

    async def _serve(self, app: web.Application, port: int) -> tuple[web.AppRunner, int]:
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, self._host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        return runner, int(runner.addresses[0][1])

    async def _shutdown(self) -> None:
        if self._closing is not None:
            self._closing.set()
        for runner in (self._api_runner, self._files_runner):
            if runner is not None:
                await runner.cleanup()
        if self._callbacks is not None:
            await self._callbacks.close()
        if self._session is not None:
            await self._session.close()

    async def serve_until_signalled(
        self, announce: Callable[[Simulator], None] | None = None
    ) -> None:
        """Start, call `announce` with the running simulator, serve until SIGINT or
        SIGTERM, then close. For serving from a command line."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signum, stop.set)
        async with self:
            if announce is not None:
                announce(self)
            await stop.wait()

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
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            asyncio.set_event_loop(loop)
            try:
                try:
                    loop.run_until_complete(self.start())
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
            yield self
        finally:
            try:
                asyncio.run_coroutine_threadsafe(self.close(), loop).result()
            finally:
                loop.call_soon_threadsafe(loop.stop)
                thread.join()

    def _on_loop(self, fn: Callable[[], _T]) -> _T:
        """Run `fn` on the simulator's loop (from any thread) and return its result."""
        loop = self._loop
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

    # -- where it listens -----------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """`http://<host>:<port><prefix>`, the API's base URL.

        Raises:
            RuntimeError: when not started.
        """
        if self._api_port is None:
            raise RuntimeError("the Simulator is not started")
        return f"http://{_url_host(self._host)}:{self._api_port}{self._prefix}"

    @property
    def files_base_url(self) -> str:
        """`http://<host>:<files port>`, the origin result video URLs point to.

        Raises:
            RuntimeError: when not started.
        """
        if self._files_port is None:
            raise RuntimeError("the Simulator is not started")
        return f"http://{_url_host(self._host)}:{self._files_port}"

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
        return self._on_loop(lambda: self._store.running(time.time()))

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
                `"short_body"`).
            on: `"create"`, `"get"`, `"list"`, `"files"` or `"any"`.
            times: how many requests get it.
            retry_after: seconds for the `Retry-After` header of `"429"` (written with `%g`,
                so fractions such as `0.2` stay fractions).
            delay: seconds a `"slow"` answer is held back.

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

        Each faulted request gets a kind drawn from `kinds`. Injected faults take
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
        task = self._store.finish(task_id, status, time.time())
        if task is not None and self._callbacks is not None:
            self._callbacks.finish(task)

    # -- the API server -------------------------------------------------------------------

    def _api_app(self) -> web.Application:
        app = web.Application(middlewares=[self._api_middleware])
        prefixes = dict.fromkeys(["", "/kling", self._prefix])
        for prefix in prefixes:
            app.router.add_post(prefix + _PATH, self._handle_create)
            app.router.add_get(prefix + _PATH, self._handle_list)
            app.router.add_get(prefix + _PATH + "/{id}", self._handle_get)
        app.router.add_route("*", "/{tail:.*}", self._handle_unknown)
        return app

    @web.middleware
    async def _api_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        counters = self.counters
        counters.requests += 1
        counters.concurrent_requests += 1
        if counters.concurrent_requests > counters.peak_concurrent_requests:
            counters.peak_concurrent_requests = counters.concurrent_requests
        try:
            body = await request.read() if request.body_exists else b""
            self._record(request, "api", body)
            await asyncio.sleep(self.latency)
            return await handler(request)
        finally:
            counters.concurrent_requests -= 1

    def _record(self, request: web.Request, server: Literal["api", "files"], body: bytes) -> None:
        headers = CIMultiDictProxy(CIMultiDict(request.headers))
        self._recent.append(
            RecordedRequest(
                request.method,
                request.path,
                request.query_string,
                headers,
                body,
                server,
                time.time(),
            )
        )

    def _take_fault(self, target: FaultTarget) -> Fault | None:
        fault = self._faults.take(target)
        if fault is not None:
            self.counters.faults_injected += 1
        return fault

    async def _answer(
        self, request: web.Request, target: FaultTarget, answer: Callable[[], web.Response]
    ) -> web.StreamResponse:
        fault = self._take_fault(target)
        if fault is not None and fault.kind in PRE_FAULTS:
            return await serve_api_fault(request, fault, None, self._closing)
        response = answer()
        if fault is not None:
            return await serve_api_fault(request, fault, response, self._closing)
        return response

    async def _handle_create(self, request: web.Request) -> web.StreamResponse:
        self.counters.creates += 1
        body = await request.read()
        return await self._answer(request, FaultTarget.CREATE, lambda: self._create(request, body))

    async def _handle_get(self, request: web.Request) -> web.StreamResponse:
        self.counters.gets += 1
        return await self._answer(request, FaultTarget.GET, lambda: self._get(request))

    async def _handle_list(self, request: web.Request) -> web.StreamResponse:
        self.counters.lists += 1
        return await self._answer(request, FaultTarget.LIST, lambda: self._list(request))

    async def _handle_unknown(self, request: web.Request) -> web.StreamResponse:
        return envelope(1202, f"no such method: {request.method} {request.path}")

    def _authenticate(self, request: web.Request) -> web.Response | None:
        """`None` when the request is authorized, else the 401 answer."""
        code = self._auth.check(request.headers.get("Authorization"))
        if code == 0:
            return None
        self.counters.auth_failures += 1
        return envelope(code)

    def _create(self, request: web.Request, body: bytes) -> web.Response:
        rejected = self._authenticate(request)
        if rejected is not None:
            return rejected
        now = time.time()
        store = self._store
        if self.credit is not None and store.created_total >= self.credit:
            self.counters.rejected_1102 += 1
            return envelope(1102)
        running = store.running(now)
        if self.running_limit is not None and running >= self.running_limit:
            self.counters.rejected_1303 += 1
            return envelope(1303)
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            payload = None
        if not isinstance(payload, dict):
            return envelope(1200, "the request body must be a JSON object")
        problem = validate_create(payload)
        if problem is not None:
            return envelope(1201, problem)
        parent = store.parent(payload["video_id"], now)
        if isinstance(parent, str):
            return envelope(1201, parent)
        task = store.create(
            payload,
            parent,
            now,
            submit_time=self.submit_time,
            processing_time=self.processing_time,
            failure_rate=self.failure_rate,
        )
        counters = self.counters
        counters.tasks_created += 1
        if task.external_task_id is not None:
            by_external = counters.creates_by_external_id
            by_external[task.external_task_id] = by_external.get(task.external_task_id, 0) + 1
        if task.callback_url is not None and self._callbacks is not None:
            self._callbacks.schedule(task)
        official = request.path.startswith("/v1/")
        return envelope(0, data=task.create_answer(official=official))

    def _get(self, request: web.Request) -> web.Response:
        rejected = self._authenticate(request)
        if rejected is not None:
            return rejected
        key = request.match_info["id"]
        task = self._store.find(key)
        if task is None:
            return envelope(1203, f"task not found: {key}")
        return envelope(0, data=task.to_json())

    def _list(self, request: web.Request) -> web.Response:
        rejected = self._authenticate(request)
        if rejected is not None:
            return rejected
        page = int_param(request.query.get("pageNum", "1"))
        size = int_param(request.query.get("pageSize", "30"))
        if page is None or page < 1:
            return envelope(1201, "pageNum must be an integer >= 1")
        if size is None or not 1 <= size <= 500:
            return envelope(1201, "pageSize must be an integer in [1, 500]")
        now = time.time()
        return envelope(0, data=[task.to_json(now) for task in self._store.page(page, size)])

    # -- the files server -----------------------------------------------------------------

    def _files_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/files/{name}", self._handle_file)
        app.router.add_route("*", "/{tail:.*}", self._handle_file_unknown)
        return app

    async def _handle_file(self, request: web.Request) -> web.StreamResponse:
        self.counters.file_requests += 1
        self._record(request, "files", b"")
        fault = self._take_fault(FaultTarget.FILES)
        if fault is not None:
            faulted = await serve_files_fault(request, fault, self._closing)
            if faulted is not None:
                return faulted
        name = request.match_info["name"]
        video = self._store.videos.get(name[:-4]) if name.endswith(".mp4") else None
        if video is None or not self._store.video_ready(video, time.time()):
            return web.Response(status=404, text="404 Not Found\n")
        cut_short = fault is not None and fault.kind in (
            FaultKind.SHORT_BODY,
            FaultKind.TRUNCATED,
        )
        return await serve_file(request, video.id, self.file_size, cut_short=cut_short)

    async def _handle_file_unknown(self, request: web.Request) -> web.StreamResponse:
        self.counters.file_requests += 1
        self._record(request, "files", b"")
        return web.Response(status=404, text="404 Not Found\n")


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0"):  # noqa: S104 - mapping the wildcard to loopback
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _cancel_all_tasks(loop: asyncio.AbstractEventLoop) -> None:
    pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
