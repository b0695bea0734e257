"""Waiting for one task on the command line: the display, the outcome, and Ctrl-C.

Used by ``extend --wait`` and ``wait``. Ctrl-C while waiting says what goes on at Kling
and how to collect it (the spinner that showed the task id is gone by then), before the
command's "interrupted" line.
"""

from __future__ import annotations

import asyncio

import click

from kling_async._cli._progress import task_status_display
from kling_async._cli._rows_out import print_task
from kling_async._cli._runtime import EXIT_FAILED, EXIT_OK, report, simulated
from kling_async._client import KlingClient
from kling_async._models import Task
from kling_async.errors import TaskFailedError, WaitTimeoutError


async def wait_and_print(
    kling: KlingClient, task: Task | str, timeout: float, *, as_json: bool
) -> int:
    """Wait for a task with a status display; print it; 0 succeeded, 1 failed or late."""
    task_id = task.task_id if isinstance(task, Task) else task
    try:
        with task_status_display(task_id) as show:
            done = await kling.wait_for_task(task, timeout=timeout, on_update=show)
    except asyncio.CancelledError:  # Ctrl-C: `asyncio.run` cancels the command's body
        click.echo(goes_on(kling, task_id), err=True)
        raise
    except (TaskFailedError, WaitTimeoutError) as error:
        print_task(error.task, as_json=as_json)
        report(str(error))
        return EXIT_FAILED
    print_task(done, as_json=as_json)
    return EXIT_OK


def goes_on(kling: KlingClient, task_id: str) -> str:
    """What an interrupted wait leaves behind, and how to collect it."""
    if simulated(kling):
        return (
            f"task {task_id} ends with the built-in simulator; for a task that outlasts the "
            "command, serve one with `kling-async simulate` and point KLING_BASE_URL at it"
        )
    return (
        f"task {task_id} goes on at Kling (and is billed): collect it with "
        f"`kling-async wait {task_id}`"
    )
