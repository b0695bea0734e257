"""The account's state: tasks, videos, ids, and which tasks are still running."""

from __future__ import annotations

import heapq
import random
import time
from collections.abc import Callable
from typing import Any

from ._create_body import CreateBody
from ._models import FAILED, SUCCEED, TERMINAL_STATUSES, SimTask, SimVideo

__all__ = [
    "DEFAULT_VIDEO_DURATION",
    "FAILURE_MESSAGES",
    "MAX_VIDEO_DURATION",
    "TaskStore",
]

FAILURE_MESSAGES: tuple[str, ...] = (
    "Failure to pass the risk control system",
    "The video failed content review",
    "Internal error during generation, please retry",
)
"""`task_status_msg` values of tasks the simulator fails (picked at random, seeded)."""

DEFAULT_VIDEO_DURATION = 5.1
"""Seconds of a parent video the simulator has never seen (any id is accepted)."""

MAX_VIDEO_DURATION = 180.0
"""A parent video this long or longer cannot be extended (400/1201)."""


class TaskStore:
    """Tasks (oldest first), videos, and a heap of deadlines to count running tasks cheaply."""

    def __init__(
        self,
        *,
        seed: int | None,
        video_url: Callable[[str], str],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self.rng = random.Random(seed)
        self._id_rng = random.Random(None if seed is None else f"kling-sim-ids-{seed}")
        # Its own stream, so that a spread leaves the seeded outcomes and ids unchanged.
        self._time_rng = random.Random(None if seed is None else f"kling-sim-times-{seed}")
        self._video_url = video_url
        self.tasks: dict[str, SimTask] = {}
        self.order: list[SimTask] = []
        self.by_external: dict[str, SimTask] = {}
        self.videos: dict[str, SimVideo] = {}
        self.created_total = 0
        self._ids: set[str] = set()
        self._running: set[str] = set()
        self._deadlines: list[tuple[float, str]] = []

    def find(self, key: str) -> SimTask | None:
        """The task with task id `key`, else the newest with external task id `key`."""
        return self.tasks.get(key) or self.by_external.get(key)

    def running(self, now: float) -> int:
        """How many tasks are not finished at `now` (amortized O(log n))."""
        deadlines, running = self._deadlines, self._running
        while deadlines and deadlines[0][0] <= now:
            running.discard(heapq.heappop(deadlines)[1])
        return len(running)

    def video_ready(self, video: SimVideo, now: float) -> bool:
        """Whether `video` exists at `now` (a result exists once its task succeeded)."""
        if video.source_task_id is None:
            return True
        return self.tasks[video.source_task_id].status_at(now) == SUCCEED

    def parent(self, video_id: str, now: float) -> SimVideo | str:
        """The video to extend (registering an unknown id as a 5.1 s video), else a problem."""
        video = self.videos.get(video_id)
        if video is None:
            video = SimVideo(video_id, self._video_url(video_id), DEFAULT_VIDEO_DURATION)
            self.videos[video_id] = video
            self._ids.add(video_id)
        elif not self.video_ready(video, now):
            return f"video_id {video_id} is not available yet"
        if video.duration >= MAX_VIDEO_DURATION:
            return "video duration exceeds 3 minutes"
        return video

    def create(
        self,
        request: CreateBody,
        payload: dict[str, Any],
        parent: SimVideo,
        now: float,
        *,
        submit_time: float,
        processing_time: float,
        failure_rate: float,
        time_spread: float = 0.0,
    ) -> SimTask:
        """Create the task of `request` (`payload`: its body as sent, kept for tests).

        Its outcome, result video and times are drawn now, seeded.

        With a `time_spread` x, its submit and processing times are drawn uniformly
        from t * (1 - x) to t * (1 + x).
        """
        if time_spread:
            low, high = 1.0 - time_spread, 1.0 + time_spread
            submit_time *= self._time_rng.uniform(low, high)
            processing_time *= self._time_rng.uniform(low, high)
        rng = self.rng
        failed = rng.random() < failure_rate
        message = rng.choice(FAILURE_MESSAGES) if failed else ""
        extension = round(rng.uniform(4.0, 5.0), 1)
        task_id, result_id = self._new_id(), self._new_id()
        duration = round(parent.duration + extension, 1)
        result = SimVideo(result_id, self._video_url(result_id), duration, task_id)
        task = SimTask(
            task_id=task_id,
            created_at=now,
            submit_time=submit_time,
            processing_time=processing_time,
            outcome=FAILED if failed else SUCCEED,
            failure_message=message,
            parent_video=parent,
            result_video=result,
            external_task_id=request.external_task_id,
            callback_url=request.callback_url,
            parent_task_id=request.parent_task_id,
            request=payload,
            clock=self._clock,
        )
        self.videos[result_id] = result
        self.tasks[task_id] = task
        self.order.append(task)
        if task.external_task_id is not None:
            self.by_external[task.external_task_id] = task
        self.created_total += 1
        self._track(task, now)
        return task

    def _track(self, task: SimTask, now: float) -> None:
        if task.forced_status is None and task.finishes_at > now:
            self._running.add(task.task_id)
            heapq.heappush(self._deadlines, (task.finishes_at, task.task_id))

    def finish(self, key: str, status: str, now: float) -> SimTask | None:
        """Force a task terminal; `None` if it already was (with that status).

        Raises:
            KeyError: unknown task.
            ValueError: the task already finished with the other status.
        """
        task = self.find(key)
        if task is None:
            raise KeyError(key)
        current = task.status_at(now)
        if current in TERMINAL_STATUSES:
            if current == status:
                return None
            raise ValueError(f"task {key} already finished as {current!r}")
        task.forced_status = status
        task.forced_at = now
        if status == FAILED and not task.failure_message:
            task.failure_message = FAILURE_MESSAGES[0]
        self._running.discard(task.task_id)
        return task

    def page(self, number: int, size: int) -> list[SimTask]:
        """Page `number` (from 1) of `size` tasks, newest first."""
        end = len(self.order) - (number - 1) * size
        if end <= 0:
            return []
        return self.order[max(end - size, 0) : end][::-1]

    def _new_id(self) -> str:
        while True:
            candidate = str(self._id_rng.randrange(10**17, 10**18))
            if candidate not in self._ids:
                self._ids.add(candidate)
                return candidate

    # -- saving and loading (see `_state.py` for the file) ---------------------------------

    def dump(self) -> dict[str, Any]:
        """The store as JSON-ready data: absolute clock times, so timing survives a restart."""
        return {
            "created_total": self.created_total,
            "ids": sorted(self._ids),
            "videos": [
                {"id": v.id, "duration": v.duration, "source_task_id": v.source_task_id}
                for v in self.videos.values()
            ],
            "tasks": [
                {
                    "task_id": t.task_id,
                    "created_at": t.created_at,
                    "submit_time": t.submit_time,
                    "processing_time": t.processing_time,
                    "outcome": t.outcome,
                    "failure_message": t.failure_message,
                    "parent_video": t.parent_video.id,
                    "result_video": t.result_video.id,
                    "external_task_id": t.external_task_id,
                    "callback_url": t.callback_url,
                    "parent_task_id": t.parent_task_id,
                    "request": t.request,
                    "forced_status": t.forced_status,
                    "forced_at": t.forced_at,
                }
                for t in self.order
            ],
        }

    def load(self, data: dict[str, Any], now: float) -> None:
        """Replace the store's content by `dump()`'s data.

        Raises:
            ValueError, TypeError, KeyError: when `data` is not what `dump` writes.
        """
        videos: dict[str, SimVideo] = {}
        for item in data["videos"]:
            video_id = _typed(item["id"], str)
            source = _optional(item["source_task_id"], str)
            duration = float(_typed(item["duration"], (int, float)))
            videos[video_id] = SimVideo(video_id, self._video_url(video_id), duration, source)
        tasks: dict[str, SimTask] = {}
        for item in data["tasks"]:
            task = SimTask(
                task_id=_typed(item["task_id"], str),
                created_at=float(_typed(item["created_at"], (int, float))),
                submit_time=float(_typed(item["submit_time"], (int, float))),
                processing_time=float(_typed(item["processing_time"], (int, float))),
                outcome=_choice(item["outcome"], TERMINAL_STATUSES),
                failure_message=_typed(item["failure_message"], str),
                parent_video=videos[item["parent_video"]],
                result_video=videos[item["result_video"]],
                external_task_id=_optional(item["external_task_id"], str),
                callback_url=_optional(item["callback_url"], str),
                parent_task_id=_optional(item["parent_task_id"], str),
                request=_typed(item["request"], dict),
                forced_status=_optional(item["forced_status"], str),
                forced_at=_optional(item["forced_at"], (int, float)),
                clock=self._clock,
            )
            if task.forced_status is not None:
                _choice(task.forced_status, TERMINAL_STATUSES)
            tasks[task.task_id] = task
        for video in videos.values():
            if video.source_task_id is not None and video.source_task_id not in tasks:
                raise ValueError(f"video {video.id} names an unknown task")
        created_total = _typed(data["created_total"], int)
        ids = {_typed(i, str) for i in _typed(data["ids"], list)}
        self.videos, self.tasks, self.created_total = videos, tasks, created_total
        self.order = list(tasks.values())
        self.by_external = {}
        for task in self.order:  # the newest task per external id wins, as when created
            if task.external_task_id is not None:
                self.by_external[task.external_task_id] = task
        self._ids = ids | set(videos) | set(tasks)
        self._running, self._deadlines = set(), []
        for task in self.order:
            self._track(task, now)


def _typed(value: Any, kind: type[Any] | tuple[type[Any], ...]) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"unexpected {type(value).__name__}: {value!r:.40}")
    return value


def _optional(value: Any, kind: type[Any] | tuple[type[Any], ...]) -> Any:
    return None if value is None else _typed(value, kind)


def _choice(value: Any, allowed: frozenset[str]) -> str:
    if value not in allowed:
        raise ValueError(f"unexpected value {value!r:.40}")
    return str(value)
