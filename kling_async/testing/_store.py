"""The account's state: tasks, videos, ids, and which tasks are still running."""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from typing import Any

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

    def __init__(self, *, seed: int | None, video_url: Callable[[str], str]) -> None:
        self.rng = random.Random(seed)
        self._id_rng = random.Random(None if seed is None else f"kling-sim-ids-{seed}")
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
        payload: dict[str, Any],
        parent: SimVideo,
        now: float,
        *,
        submit_time: float,
        processing_time: float,
        failure_rate: float,
    ) -> SimTask:
        """Create a task (its outcome and result video are drawn now, seeded)."""
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
            external_task_id=payload.get("external_task_id"),
            callback_url=payload.get("callback_url"),
            parent_task_id=payload.get("task_id"),
            request=payload,
        )
        self.videos[result_id] = result
        self.tasks[task_id] = task
        self.order.append(task)
        if task.external_task_id is not None:
            self.by_external[task.external_task_id] = task
        self.created_total += 1
        if task.finishes_at > now:
            self._running.add(task_id)
            heapq.heappush(self._deadlines, (task.finishes_at, task_id))
        return task

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
