"""The simulator's aiohttp handlers: the API (auth, create, get, list) and the files server."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import Literal, Protocol

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict, CIMultiDictProxy

from ._auth import Authenticator
from ._create_body import read_create
from ._faults import (
    PRE_FAULTS,
    Fault,
    FaultPlan,
    connection_gone,
    drop_connection,
    hold,
    interruptible_sleep,
    serve_api_fault,
    serve_files_fault,
)
from ._files import serve_file
from ._models import Counters, FaultKind, FaultTarget, RecordedRequest, SimTask
from ._packs import PackLedger
from ._store import TaskStore
from ._wire import envelope, int_param

__all__ = ["API_PATH", "COSTS_PATH", "Handlers", "Settings"]

API_PATH = "/v1/videos/video-extend"
COSTS_PATH = "/account/costs"
#: Kling answers one costs query a second; a faster one gets 429, code 1302.
COSTS_INTERVAL = 1.0


class Settings(Protocol):
    """What the handlers read from the `Simulator` at every request (its public knobs)."""

    counters: Counters
    latency: float
    credit: int | None
    running_limit: int | None
    submit_time: float
    processing_time: float
    time_spread: float
    failure_rate: float
    file_size: int
    refuse_duplicate_external_ids: bool


class Handlers:
    """The handlers of both servers, over the simulator's store, faults and clock.

    Args:
        settings: the simulator's configuration and counters.
        store: tasks and videos.
        faults: the fault plan.
        auth: the `Authorization` checker.
        clock: the simulator's clock.
        recent: where requests are recorded.
        closing: the event set when the simulator closes (cuts slow answers short).
        on_request: called as every API request arrives (delivers callbacks now due).
        on_created: called with each task created (callbacks, saving the state).
        packs: the account's resource packs, if any are configured.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        store: TaskStore,
        faults: FaultPlan,
        auth: Authenticator,
        clock: Callable[[], float],
        recent: collections.deque[RecordedRequest],
        closing: Callable[[], asyncio.Event | None],
        on_request: Callable[[], None],
        on_created: Callable[[SimTask], None],
        packs: PackLedger | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._faults = faults
        self._auth = auth
        self._clock = clock
        self._recent = recent
        self._closing = closing
        self._on_request = on_request
        self._on_created = on_created
        self._packs = packs
        self._last_costs_query: float | None = None
        self._in_flight: dict[int, web.BaseRequest] = {}  # by id(): requests are unhashable
        self._holds: set[asyncio.Task[web.Response | None]] = set()

    async def close(self) -> None:
        """Wait for held creates (`"hold"` faults) to end; call once `closing` is set,
        which cuts them short without creating their tasks."""
        while self._holds:
            await asyncio.gather(*self._holds, return_exceptions=True)

    # -- the API server -------------------------------------------------------------------

    def api_app(self, prefix: str) -> web.Application:
        """The API application, answering under `""`, `"/kling"` and `prefix`."""
        app = web.Application(middlewares=[self._api_middleware])
        for root in dict.fromkeys(["", "/kling", prefix]):
            app.router.add_post(root + API_PATH, self._handle_create)
            app.router.add_get(root + API_PATH, self._handle_list)
            app.router.add_get(root + API_PATH + "/{id}", self._handle_get)
        # The official API's costs: not under a gateway's prefix (gateways lack it).
        app.router.add_get(COSTS_PATH, self._handle_costs)
        app.router.add_route("*", "/{tail:.*}", self._handle_unknown)
        return app

    @web.middleware
    async def _api_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        counters = self._settings.counters
        counters.requests += 1
        self._enter(request)
        try:
            self._on_request()
            body = await request.read() if request.body_exists else b""
            self._record(request, "api", body)
            latency = self._settings.latency
            if latency > 0:
                await interruptible_sleep(latency, self._closing(), request)
            else:
                await asyncio.sleep(0)  # overlap concurrent requests, as a real server does
            return await handler(request)
        finally:
            self._in_flight.pop(id(request), None)
            counters.concurrent_requests = len(self._in_flight)

    def _enter(self, request: web.BaseRequest) -> None:
        """Count `request` as in progress, after dropping the ones whose client has gone.

        A client that timed out closed its connection; its handler may still be sleeping
        (a slow fault) but no one waits for the answer any more, so it no longer counts.
        Sweeping here, when a request arrives, means a retry arriving in the loop iteration
        that sees the old connection close is not counted on top of it.
        """
        in_flight = self._in_flight
        for key in [key for key, other in in_flight.items() if connection_gone(other)]:
            del in_flight[key]
        in_flight[id(request)] = request
        counters = self._settings.counters
        counters.concurrent_requests = len(in_flight)
        if counters.concurrent_requests > counters.peak_concurrent_requests:
            counters.peak_concurrent_requests = counters.concurrent_requests

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
                self._clock(),
            )
        )

    def _take_fault(self, target: FaultTarget) -> Fault | None:
        fault = self._faults.take(target)
        if fault is not None:
            self._settings.counters.faults_injected += 1
        return fault

    async def _answer(
        self, request: web.Request, target: FaultTarget, answer: Callable[[], web.Response]
    ) -> web.StreamResponse:
        fault = self._take_fault(target)
        if fault is not None and fault.kind in PRE_FAULTS:
            return await serve_api_fault(request, fault, None, self._closing())
        if fault is not None and fault.kind is FaultKind.HOLD:
            if target is FaultTarget.CREATE:
                return await self._hold_create(request, fault.delay, answer)
            await interruptible_sleep(fault.delay, self._closing(), request)  # then look
            return answer()
        response = answer()
        if fault is not None:
            return await serve_api_fault(request, fault, response, self._closing())
        return response

    async def _hold_create(
        self, request: web.Request, delay: float, answer: Callable[[], web.Response]
    ) -> web.StreamResponse:
        """A queueing gateway: process the create after `delay` seconds, client or not.

        The hold runs in a task of its own, so that it ends (creating the task) even if
        aiohttp cancels this handler; the client gets the answer if it is still there.
        """
        held = asyncio.ensure_future(self._held(delay, answer))
        self._holds.add(held)
        held.add_done_callback(self._holds.discard)
        response = await asyncio.shield(held)
        if response is None:  # the simulator is closing: the gateway forwards nothing
            return await drop_connection(request)
        return response

    async def _held(self, delay: float, answer: Callable[[], web.Response]) -> web.Response | None:
        if not await hold(delay, self._closing()):
            return None
        return answer()

    async def _handle_create(self, request: web.Request) -> web.StreamResponse:
        self._settings.counters.creates += 1
        body = await request.read()
        return await self._answer(request, FaultTarget.CREATE, lambda: self._create(request, body))

    async def _handle_get(self, request: web.Request) -> web.StreamResponse:
        self._settings.counters.gets += 1
        return await self._answer(request, FaultTarget.GET, lambda: self._get(request))

    async def _handle_list(self, request: web.Request) -> web.StreamResponse:
        self._settings.counters.lists += 1
        return await self._answer(request, FaultTarget.LIST, lambda: self._list(request))

    async def _handle_unknown(self, request: web.Request) -> web.StreamResponse:
        return envelope(1202, f"no such method: {request.method} {request.path}")

    def _authenticate(self, request: web.Request) -> web.Response | None:
        """`None` when the request is authorized, else the 401 answer."""
        code = self._auth.check(request.headers.get("Authorization"))
        if code == 0:
            return None
        self._settings.counters.auth_failures += 1
        return envelope(code)

    def _create(self, request: web.Request, body: bytes) -> web.Response:
        rejected = self._authenticate(request)
        if rejected is not None:
            return rejected
        now = self._clock()
        store, settings, counters = self._store, self._settings, self._settings.counters
        if settings.credit is not None and store.created_total >= settings.credit:
            counters.rejected_1102 += 1
            return envelope(1102)
        if self._packs is not None and not self._packs.usable(now):
            counters.rejected_1102 += 1
            return envelope(1102)
        if settings.running_limit is not None and store.running(now) >= settings.running_limit:
            counters.rejected_1303 += 1
            return envelope(1303)
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            payload = None
        if not isinstance(payload, dict):
            return envelope(1200, "the request body must be a JSON object")
        create = read_create(payload)
        if isinstance(create, str):
            return envelope(1201, create)
        external = create.external_task_id
        if (
            settings.refuse_duplicate_external_ids
            and external is not None
            and external in store.by_external
        ):
            counters.rejected_duplicates += 1
            return envelope(1201, "external_task_id already exists")
        parent = store.parent(create.video_id, now)
        if isinstance(parent, str):
            return envelope(1201, parent)
        task = store.create(
            create,
            payload,
            parent,
            now,
            submit_time=settings.submit_time,
            processing_time=settings.processing_time,
            failure_rate=settings.failure_rate,
            time_spread=settings.time_spread,
        )
        counters.tasks_created += 1
        running = store.running(now)
        if running > counters.peak_running_tasks:
            counters.peak_running_tasks = running
        if task.external_task_id is not None:
            by_external = counters.creates_by_external_id
            by_external[task.external_task_id] = by_external.get(task.external_task_id, 0) + 1
        self._on_created(task)
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
        return envelope(0, data=task.to_json(self._clock()))

    async def _handle_costs(self, request: web.Request) -> web.StreamResponse:
        counters = self._settings.counters
        counters.costs_queries += 1
        rejected = self._authenticate(request)
        if rejected is not None:
            return rejected
        arrived, last = time.monotonic(), self._last_costs_query
        self._last_costs_query = arrived
        if last is not None and arrived - last < COSTS_INTERVAL:
            counters.costs_too_fast += 1
            return envelope(1302)
        start = int_param(request.query.get("start_time", ""))
        end = int_param(request.query.get("end_time", ""))
        if start is None or end is None or end < start:
            return envelope(1201, "start_time and end_time must be Unix ms, start <= end")
        name = request.query.get("resource_pack_name") or None
        packs, now = self._packs, self._clock()
        infos = [] if packs is None else packs.infos(now, start / 1000, end / 1000, name)
        return envelope(0, data={"code": 0, "msg": "", "resource_pack_subscribe_infos": infos})

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
        now = self._clock()
        return envelope(0, data=[task.to_json(now) for task in self._store.page(page, size)])

    # -- the files server -----------------------------------------------------------------

    def files_app(self) -> web.Application:
        """The result-files application (the "CDN")."""
        app = web.Application()
        app.router.add_get("/files/{name}", self._handle_file)
        app.router.add_route("*", "/{tail:.*}", self._handle_file_unknown)
        return app

    async def _handle_file(self, request: web.Request) -> web.StreamResponse:
        self._settings.counters.file_requests += 1
        self._record(request, "files", b"")
        fault = self._take_fault(FaultTarget.FILES)
        if fault is not None:
            faulted = await serve_files_fault(request, fault, self._closing())
            if faulted is not None:
                return faulted
        name = request.match_info["name"]
        video = self._store.videos.get(name[:-4]) if name.endswith(".mp4") else None
        if video is None or not self._store.video_ready(video, self._clock()):
            return web.Response(status=404, text="404 Not Found\n")
        cut_short = fault is not None and fault.kind in (
            FaultKind.SHORT_BODY,
            FaultKind.TRUNCATED,
        )
        return await serve_file(
            request,
            video.id,
            self._settings.file_size,
            video.duration,
            cut_short=cut_short,
            unframed=fault is not None and fault.kind is FaultKind.TRUNCATED,
        )

    async def _handle_file_unknown(self, request: web.Request) -> web.StreamResponse:
        self._settings.counters.file_requests += 1
        self._record(request, "files", b"")
        return web.Response(status=404, text="404 Not Found\n")
