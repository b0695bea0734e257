"""The types of the callables and objects that public signatures take.

Exported from `kling_async` so that code passing hooks can be type-checked:
``def show(task: Task) -> None`` is an `OnUpdate`, a `CallbackReceiver` is a
`CallbackSource`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from kling_async._models import BatchProgress, Task

__all__ = [
    "CallbackSource",
    "CallbackSubscription",
    "OnDownloadProgress",
    "OnProgress",
    "OnUpdate",
]

#: `wait_for_task`'s `on_update`: told (sync or async) about every status change.
OnUpdate = Callable[[Task], Awaitable[None] | None]
#: `extend_many`'s `on_progress`: told (sync or async) about the batch's progress.
OnProgress = Callable[[BatchProgress], Awaitable[None] | None]
#: `download`'s `on_progress`: told ``(bytes_done, bytes_total_or_None)``.
OnDownloadProgress = Callable[[int, int | None], Awaitable[None] | None]


class CallbackSubscription(Protocol):
    """The updates of one task, as a callback receiver collects them."""

    async def next(self, timeout: float) -> Task | None:
        """The next task update that arrives within `timeout` seconds, else None."""

    def close(self) -> None:
        """Stop collecting."""


class CallbackSource(Protocol):
    """What `callbacks=` takes: `kling_async.callbacks.CallbackReceiver` is one."""

    @property
    def url(self) -> str:
        """The public URL Kling should POST task updates to."""

    def subscribe(self, task_id: str) -> CallbackSubscription:
        """Start collecting callbacks for one task."""
