"""`extend_chain`: extend a video again and again, each step from the last one's result."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import attrs

from kling_async._models import WAIT_TIMEOUT, ExtendRequest, Task, Video
from kling_async._tasks import Tasks
from kling_async.errors import TaskFailedError, ValidationError

#: Kling extends a video only while it is at most this long (3 minutes).
MAX_VIDEO_SECONDS: Final = 180.0
#: The most one extension adds (API.md: each adds 4-5 s); checks assume the worst case.
MAX_STEP_SECONDS: Final = 5.0
_STEP_OPTIONS: Final = frozenset({"negative_prompt", "cfg_scale", "callback_url", "watermark"})


def _check_room(duration: float, steps_left: int, step: int) -> None:
    if duration + MAX_STEP_SECONDS * steps_left > MAX_VIDEO_SECONDS:
        raise ValidationError(
            "prompts",
            f"step {step + 1} would take the video from {duration:g} s past "
            f"{MAX_VIDEO_SECONDS:g} s ({steps_left} more step(s) of up to "
            f"{MAX_STEP_SECONDS:g} s each); Kling extends videos only up to 3 minutes",
        )


async def extend_chain(
    tasks: Tasks,
    video: str | Video,
    prompts: Sequence[str],
    *,
    parent_task_id: str | None = None,
    **options: Any,
) -> list[Task]:
    """See `KlingClient.extend_chain`."""
    given: object = prompts  # annotations bind mypy, not the caller
    if not isinstance(given, Sequence) or isinstance(given, (str, bytes)) or not given:
        raise ValidationError("prompts", "must be a non-empty sequence of strings", prompts)
    unknown = set(options) - _STEP_OPTIONS
    if unknown:
        raise ValidationError(
            sorted(unknown)[0], f"is not a chain option (use {', '.join(sorted(_STEP_OPTIONS))})"
        )
    video_id = video.id if isinstance(video, Video) else video
    # Build every step's request now, so a bad prompt fails before anything is billed.
    requests = [
        ExtendRequest(video_id=video_id, prompt=prompt, parent_task_id=parent_task_id, **options)
        for prompt in prompts
    ]
    duration = video.duration if isinstance(video, Video) else None
    if duration is not None:
        _check_room(duration, len(requests), 0)
    elif len(requests) * 4.0 > MAX_VIDEO_SECONDS:
        _check_room(0.0, len(requests), 0)
    steps: list[Task] = []
    for step, template in enumerate(requests):
        request = attrs.evolve(template, video_id=video_id, parent_task_id=parent_task_id)
        if duration is not None:
            _check_room(duration, len(requests) - step, step)
        try:
            done = await tasks.extend_and_wait(
                request, timeout=WAIT_TIMEOUT, on_update=None, callbacks=None
            )
        except TaskFailedError as error:
            raise TaskFailedError(error.task, steps=tuple(steps)) from None
        steps.append(done)
        if not done.videos:
            raise TaskFailedError(done, steps=tuple(steps[:-1]))
        result = done.videos[0]
        video_id, parent_task_id, duration = result.id, done.task_id, result.duration
    return steps
