"""Reference the docs build generates from the code, so the pages cannot drift from it.

An mkdocs hook (``hooks:`` in mkdocs.yml). ``<!-- generated: error-codes -->`` in a page
becomes the table of the service's codes, built from `kling_async._protocol.ERROR_CODES`,
so a code added there appears on the errors page at the next build.

The polling numbers of the polling guide are computed here too (`polling_table`); the
page carries the table as text, and tests/test_guides.py recomputes it and compares.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, NamedTuple

from kling_async import PollPolicy
from kling_async._tasks import CALLBACK_BACKSTOP_FACTOR

ERROR_CODES_MARKER = "<!-- generated: error-codes -->"

#: The task durations the polling guide's table is about, in seconds.
TASK_SECONDS = (10.0, 30.0, 120.0, 300.0)


def on_page_markdown(markdown: str, /, *, page: Any, config: Any, files: Any) -> str:
    """mkdocs hook: put the generated tables where a page asks for them."""
    if ERROR_CODES_MARKER in markdown:
        markdown = markdown.replace(ERROR_CODES_MARKER, error_codes_table())
    return markdown


def error_codes_table() -> str:
    """The service's codes as a Markdown table, in the order of the protocol's table."""
    # Imported here, so the polling numbers below need nothing but PollPolicy.
    from kling_async._protocol import ERROR_CODES

    lines = [
        "| HTTP status | code | meaning | exception | retried | what to do |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for rule in ERROR_CODES:
        name = rule.error.__name__
        # An autorefs link to the class's entry rendered further down the errors page.
        error = f"[`{name}`][kling_async.errors.{name}]"
        retried = "yes" if rule.retryable else "no"
        lines.append(
            f"| {rule.status} | {rule.code} | {rule.meaning} | {error} | {retried} "
            f"| {rule.action} |"
        )
    return "\n".join(lines)


# -- polling ---------------------------------------------------------------------------


def poll_intervals(policy: PollPolicy, *, scale: float = 1.0) -> Iterator[float]:
    """The gaps between `wait_for_task`'s looks, without jitter (`scale` times longer)."""
    n = 0
    while True:
        yield scale * min(policy.initial * policy.factor**n, policy.max_interval)
        n += 1


def look_times(policy: PollPolicy, until: float, *, scale: float = 1.0) -> list[float]:
    """When the looks happen (seconds after the task was created), up to the first >= until."""
    times: list[float] = []
    now = 0.0
    for interval in poll_intervals(policy, scale=scale):
        now += interval
        times.append(now)
        if now >= until:
            return times
    raise AssertionError("unreachable")  # pragma: no cover


class PollingRow(NamedTuple):
    """How one task length fares: polls only, and with callbacks (polls as the backstop)."""

    seconds: float
    polls: int  # looks until the one that sees the task finished
    late_worst: float  # the gap between looks around that time
    late_average: float  # half of it: a task finishes anywhere in the gap
    backstop_polls: int  # with callbacks: looks made before the callback ends the wait
    backstop_late_worst: float  # with callbacks, when the callback is lost


def polling_row(policy: PollPolicy, seconds: float) -> PollingRow:
    """The numbers for a task that finishes `seconds` after it was created."""
    looks = look_times(policy, seconds)
    gap = looks[-1] - (looks[-2] if len(looks) > 1 else 0.0)
    backstop = look_times(policy, seconds, scale=CALLBACK_BACKSTOP_FACTOR)
    backstop_gap = backstop[-1] - (backstop[-2] if len(backstop) > 1 else 0.0)
    return PollingRow(
        seconds=seconds,
        polls=len(looks),
        late_worst=gap,
        late_average=gap / 2,
        backstop_polls=sum(1 for when in backstop if when < seconds),
        backstop_late_worst=backstop_gap,
    )


def _seconds(value: float) -> str:
    if value >= 60 and math.isclose(value % 60, 0):
        return f"{value / 60:g} min"
    return f"{round(value, 2):g} s"


def polling_table(policy: PollPolicy | None = None) -> str:
    """The polling guide's table, as Markdown."""
    policy = policy or PollPolicy()
    lines = [
        "| task takes | polls | noticed late, worst | on average "
        "| with callbacks: polls | late | late if the callback is lost |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for seconds in TASK_SECONDS:
        row = polling_row(policy, seconds)
        lines.append(
            f"| {_seconds(row.seconds)} | {row.polls} | {_seconds(row.late_worst)} "
            f"| {_seconds(row.late_average)} | {row.backstop_polls} | ~0 s "
            f"| {_seconds(row.backstop_late_worst)} |"
        )
    return "\n".join(lines)


def look_times_text(policy: PollPolicy | None = None, *, count: int = 8) -> str:
    """The first `count` look times, as the guide writes them ("2, 5, 9.5, ...")."""
    policy = policy or PollPolicy()
    return ", ".join(f"{when:g}" for when in _first_looks(policy, count))


def _first_looks(policy: PollPolicy, count: int) -> list[float]:
    times: list[float] = []
    now = 0.0
    for interval in poll_intervals(policy):
        now += interval
        times.append(round(now, 3))
        if len(times) == count:
            return times
    raise AssertionError("unreachable")  # pragma: no cover


if __name__ == "__main__":
    print("looks at", look_times_text(), "...")
    print(polling_table())
