"""Value types of the simulator: fault kinds, counters, recorded requests, tasks and videos."""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

__all__ = [
    "ALL_FAULT_KINDS",
    "CallbackDelivery",
    "Counters",
    "FaultKind",
    "FaultTarget",
    "LiveCounters",
    "RecordedRequest",
    "SimTask",
    "SimVideo",
]


class FaultKind(str, enum.Enum):
    """A fault the simulator can inject into an answer (pass the member or its string value).

    Attributes:
        SERVER_ERROR: HTTP 500, envelope code 5000.
        SERVICE_UNAVAILABLE: HTTP 503, envelope code 5001.
        GATEWAY_TIMEOUT: HTTP 504, envelope code 5002.
        RATE_LIMITED: HTTP 429, code 1302, with `Retry-After` when a `retry_after` is given.
        DROP_BEFORE: the connection is closed without any answer; no task is created.
        DROP_AFTER: a create *does* create the task, then the connection is closed unanswered.
        SLOW: the answer is held back `delay` seconds (a create creates its task first).
        HTML: HTTP 200 with a proxy's HTML page (a create creates its task first).
        TRUNCATED: HTTP 200 with the JSON body cut in half (a create creates its task first);
            on the files server, half the file with neither `Content-Length` nor chunked
            encoding, then the connection closes (the cut looks like the end of the file).
        SHORT_BODY: `Content-Length` announces the full body but the connection closes after
            half of it (meant for the files server; on the API it cuts the envelope).
        HOLD: a gateway that queues the request: a create gets no answer for `delay`
            seconds (the connection stays open), and only then is it processed and its
            task created, even when the client has timed out and gone meanwhile (a look-up
            during the hold answers 404/1203). A client still connected then gets the
            normal answer. On gets, lists and files the answer is worked out and sent
            after `delay` (like `SLOW`, cut short when the client goes). `delay` is real
            time, whatever the simulator's clock; closing the simulator cuts a hold short
            (a create then creates nothing and its connection is closed). Not in
            `ALL_FAULT_KINDS`.
        EMPTY_DATA: HTTP 200 `{"code": 0, "message": "SUCCEED", "data": null}` (a create
            creates its task first; a get or list answers no data); on the files server an
            empty 200 body. Not in `ALL_FAULT_KINDS`.
    """

    SERVER_ERROR = "500"
    SERVICE_UNAVAILABLE = "503"
    GATEWAY_TIMEOUT = "504"
    RATE_LIMITED = "429"
    DROP_BEFORE = "drop_before"
    DROP_AFTER = "drop_after"
    SLOW = "slow"
    HTML = "html"
    TRUNCATED = "truncated"
    SHORT_BODY = "short_body"
    HOLD = "hold"
    EMPTY_DATA = "empty_data"


_NOT_BY_DEFAULT = frozenset({FaultKind.HOLD, FaultKind.EMPTY_DATA})

ALL_FAULT_KINDS: tuple[FaultKind, ...] = tuple(k for k in FaultKind if k not in _NOT_BY_DEFAULT)
"""Every fault kind but `HOLD` and `EMPTY_DATA`, the default of `Simulator.set_fault_rate`.

Ask for those two by name: `set_fault_rate(..., kinds=[*ALL_FAULT_KINDS, "hold"])`.

`HOLD` is left out because a held create makes its task after the client gave up on it
(by design, as a queueing gateway does), so whether a client that looks up and creates
again meanwhile ends with two tasks depends on its retry timing against `delay`: in the
default mix that would make "one task per input" checks pass or fail by timing, and each
hold keeps a connection open `delay` seconds (2 s by default).

`EMPTY_DATA` is left out because tests built on this default expect every faulted poll
to be retried or recovered, and an answer that says success but carries no task is a
different failure, to be asked for on purpose.
"""


class FaultTarget(str, enum.Enum):
    """Which requests a fault applies to (pass the member or its string value)."""

    CREATE = "create"
    GET = "get"
    LIST = "list"
    FILES = "files"
    ANY = "any"


@dataclasses.dataclass(slots=True)
class Counters:
    """What the simulator has seen, readable at any time (plain ints and dicts).

    Attributes:
        requests: every request the API server received (any route).
        creates: create requests received (whatever their answer).
        tasks_created: tasks actually created.
        creates_by_external_id: tasks created per `external_task_id`.
        peak_concurrent_requests: most API requests in progress at once.
        concurrent_requests: API requests in progress now.
        peak_running_tasks: most tasks running at once (a task runs from its creation
            until it finishes, on its own or by `Simulator.finish_task`), by the
            simulator's clock: the running tasks are counted at every task creation, the
            only moments the number can grow. After `reset` it starts from the tasks
            running then. (`Simulator.running_tasks` gives the number now.)
        rejected_1303: creates answered 429/1303 (over `running_limit`).
        rejected_1102: creates answered 429/1102 (no `credit` left).
        rejected_duplicates: creates answered 400/1201 because their `external_task_id`
            already named a task (with `Simulator.refuse_duplicate_external_ids`).
        auth_failures: requests answered 401.
        gets: get-one requests received.
        lists: list requests received.
        file_requests: requests the files server received.
        callbacks_sent: callback deliveries answered with a 2xx status.
        callbacks_failed: callback deliveries that failed (error or non-2xx status).
        callbacks_dropped: callbacks skipped because `Simulator.drop_callbacks` was set.
        faults_injected: faults applied (injected or random).
        costs_queries: ``GET /account/costs`` requests received.
        costs_too_fast: costs queries answered 429/1302 because they came less than a
            second after the previous one (Kling allows one a second).
    """

    requests: int = 0
    creates: int = 0
    tasks_created: int = 0
    creates_by_external_id: dict[str, int] = dataclasses.field(default_factory=dict)
    peak_concurrent_requests: int = 0
    concurrent_requests: int = 0
    peak_running_tasks: int = 0
    rejected_1303: int = 0
    rejected_1102: int = 0
    rejected_duplicates: int = 0
    auth_failures: int = 0
    gets: int = 0
    lists: int = 0
    file_requests: int = 0
    callbacks_sent: int = 0
    callbacks_failed: int = 0
    callbacks_dropped: int = 0
    faults_injected: int = 0
    costs_queries: int = 0
    costs_too_fast: int = 0

    @property
    def duplicate_external_ids(self) -> dict[str, int]:
        """`external_task_id`s that got more than one task, with their task counts."""
        return {key: n for key, n in self.creates_by_external_id.items() if n > 1}

    def reset(self) -> None:
        """Zero every counter (requests in progress stay counted in `concurrent_requests`,
        and `peak_running_tasks` starts from the tasks running now)."""
        in_flight = self.concurrent_requests
        for field in dataclasses.fields(self):
            if field.name == "creates_by_external_id":
                self.creates_by_external_id = {}
            else:
                setattr(self, field.name, 0)
        self.concurrent_requests = in_flight
        self.peak_concurrent_requests = in_flight
        self.peak_running_tasks = self._running_now()

    def as_dict(self) -> dict[str, Any]:
        """A plain-dict snapshot of every counter."""
        data = dataclasses.asdict(self)
        data["duplicate_external_ids"] = self.duplicate_external_ids
        return data

    def _running_now(self) -> int:
        """Tasks running now, where `reset` starts `peak_running_tasks` from (none known
        here; a simulator's counters ask its tasks)."""
        return 0


class LiveCounters(Counters):
    """The `Counters` of a simulator: `reset` asks `running` for the tasks running now.

    Not a dataclass of its own, so `dataclasses.fields`, `asdict` and `as_dict` see
    exactly the counters of `Counters`.
    """

    __slots__ = ("_running",)

    def __init__(self, running: Callable[[], int]) -> None:
        super().__init__()
        self._running = running

    def _running_now(self) -> int:
        return self._running()


@dataclasses.dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as the simulator received it.

    Attributes:
        method: HTTP method.
        path: URL path (without the query string).
        query_string: raw query string, "" when none.
        headers: request headers, a read-only case-insensitive mapping.
        body: raw request body.
        server: `"api"` or `"files"`.
        received_at: Unix time in seconds.
    """

    method: str
    path: str
    query_string: str
    headers: Mapping[str, str]
    body: bytes
    server: Literal["api", "files"]
    received_at: float


@dataclasses.dataclass(frozen=True, slots=True)
class CallbackDelivery:
    """One callback POST the simulator attempted.

    Attributes:
        url: the task's `callback_url`.
        body: the JSON body sent (the task object).
        headers: headers sent, including the `webhook-*` signature headers when signing is on.
        status: HTTP status of the receiver's answer, `None` when the request failed.
        error: `repr` of the exception when the request failed, else `None`.
    """

    url: str
    body: bytes
    headers: dict[str, str]
    status: int | None
    error: str | None


@dataclasses.dataclass(slots=True)
class SimVideo:
    """A video the simulator knows: a parent someone extended, or a task's result.

    Attributes:
        id: 18-digit video id (or whatever id a caller passed for an unknown parent).
        url: where the files server serves it.
        duration: seconds.
        source_task_id: the task that produces it, `None` for parent videos.
    """

    id: str
    url: str
    duration: float
    source_task_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The `{"id", "url", "duration"}` object of the wire format (duration as a string)."""
        return {"id": self.id, "url": self.url, "duration": f"{self.duration:.1f}"}


SUBMITTED = "submitted"
PROCESSING = "processing"
SUCCEED = "succeed"
FAILED = "failed"
TERMINAL_STATUSES = frozenset({SUCCEED, FAILED})


@dataclasses.dataclass(slots=True, eq=False)
class SimTask:
    """A task the simulator created; its status is computed from timestamps when read.

    Attributes:
        task_id: 18-digit task id.
        created_at: Unix time in seconds (by the simulator's clock).
        submit_time: seconds the task stays `submitted`.
        processing_time: further seconds in `processing`.
        outcome: `"succeed"` or `"failed"`, decided at creation.
        failure_message: `task_status_msg` when the task fails.
        parent_video: the video being extended.
        result_video: the video a success produces (served once the task succeeded).
        external_task_id: the caller's id, if any.
        callback_url: where status changes are POSTed, if any.
        parent_task_id: the `task_id` field of the create body, if any.
        request: the create body as received.
        forced_status: terminal status set by `Simulator.finish_task`, if any.
        forced_at: when `forced_status` was set.
        clock: the simulator's clock, which `status` reads.
    """

    task_id: str
    created_at: float
    submit_time: float
    processing_time: float
    outcome: str
    failure_message: str
    parent_video: SimVideo
    result_video: SimVideo
    external_task_id: str | None
    callback_url: str | None
    parent_task_id: str | None
    request: dict[str, Any]
    forced_status: str | None = None
    forced_at: float | None = None
    clock: Callable[[], float] = dataclasses.field(default=time.time, repr=False)

    @property
    def processing_at(self) -> float:
        """Unix time the task turns `processing`."""
        return self.created_at + self.submit_time

    @property
    def finishes_at(self) -> float:
        """Unix time the task finishes on its own (unless forced earlier)."""
        return self.created_at + self.submit_time + self.processing_time

    @property
    def status(self) -> str:
        """Status now (by the simulator's clock): `submitted`, `processing`, `succeed`
        or `failed`."""
        return self.status_at(self.clock())

    def status_at(self, now: float) -> str:
        """Status at Unix time `now`."""
        if self.forced_status is not None and self.forced_at is not None and self.forced_at <= now:
            return self.forced_status
        if now < self.processing_at:
            return SUBMITTED
        if now < self.finishes_at:
            return PROCESSING
        return self.outcome

    def updated_at(self, now: float) -> float:
        """Unix time (seconds) of the last status change at `now`."""
        if self.forced_status is not None and self.forced_at is not None and self.forced_at <= now:
            return self.forced_at
        if now >= self.finishes_at:
            return self.finishes_at
        if now >= self.processing_at:
            return self.processing_at
        return self.created_at

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        """The task object of the wire format (the envelope's `data`) at Unix time `now`."""
        if now is None:
            now = self.clock()
        status = self.status_at(now)
        info: dict[str, Any] = {"parent_video": self.parent_video.to_json()}
        if self.external_task_id is not None:
            info["external_task_id"] = self.external_task_id
        data: dict[str, Any] = {
            "task_id": self.task_id,
            "task_status": status,
            "task_status_msg": self.failure_message if status == FAILED else "",
            "task_info": info,
        }
        if status == SUCCEED:
            video = self.result_video.to_json()
            watermark = self.request.get("watermark_info")
            if isinstance(watermark, dict) and watermark.get("enabled") is True:
                video["watermark_url"] = f"{self.result_video.url}?watermark=1"
            data["task_result"] = {"videos": [video]}
            data["final_unit_deduction"] = "1"
        elif status == FAILED:
            data["task_result"] = {"videos": []}
        data["created_at"] = int(self.created_at * 1000)
        data["updated_at"] = int(self.updated_at(now) * 1000)
        return data

    def create_answer(self, *, official: bool) -> dict[str, Any]:
        """The short task object a create answers with (official or gateway style)."""
        data: dict[str, Any] = {
            "task_id": self.task_id,
            "task_status": self.status_at(self.created_at),
        }
        if official:
            info: dict[str, Any] = {}
            if self.external_task_id is not None:
                info["external_task_id"] = self.external_task_id
            data["task_info"] = info
        created = int(self.created_at * 1000)
        data["created_at"] = created
        data["updated_at"] = created
        return data
