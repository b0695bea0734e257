"""The public data types: requests, tasks, videos, batch results and the poll policy.

All are frozen attrs classes with slots. `ExtendRequest` checks its fields when it is
built, so a bad request fails in the caller's code, before anything is sent.
"""

from __future__ import annotations

import enum
import math
import re
import urllib.parse
from datetime import datetime, timedelta
from typing import Any, Final

import attrs

from kling_async.errors import KlingError, ValidationError

__all__ = [
    "BatchProgress",
    "BatchResult",
    "ExtendRequest",
    "PollPolicy",
    "ResourcePack",
    "Task",
    "TaskStatus",
    "Video",
]

#: The longest prompt (and negative prompt) the service accepts, in characters.
MAX_PROMPT_LENGTH = 2500
#: How long Kling keeps a task's results before deleting them.
RESULT_LIFETIME = timedelta(days=30)
#: The longest external task id we send.
MAX_EXTERNAL_ID_LENGTH = 256

_WHITESPACE = re.compile(r"\s")


def is_http_url(value: object, *, for_callbacks: bool = False) -> bool:
    """An absolute http(s) URL with a host, a valid port and no whitespace.

    `for_callbacks`: also no ``user:password@`` (it would be sent to Kling in clear) and no
    fragment (a fragment never reaches a server).
    """
    if not isinstance(value, str) or _WHITESPACE.search(value) is not None:
        return False
    try:
        parts = urllib.parse.urlsplit(value)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a port outside 0-65535
    except ValueError:
        return False
    if for_callbacks and (parts.username is not None or parts.password is not None):
        return False
    if for_callbacks and (parts.fragment or "#" in value):
        return False
    return parts.scheme in ("http", "https") and bool(host)


def _empty_is_none(value: object) -> object:
    # An empty optional field means "not given" (the endpoint page's own example sends
    # "negative_prompt": "" and "callback_url": "").
    return None if value == "" else value


def _check_id(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None and attribute.default is None:
        return
    if not isinstance(value, str):
        raise ValidationError(attribute.name, "must be a string", value)
    if not value or _WHITESPACE.search(value) is not None:
        raise ValidationError(attribute.name, "must be non-empty with no whitespace", value)
    if len(value) > MAX_EXTERNAL_ID_LENGTH:
        raise ValidationError(
            attribute.name, f"must be at most {MAX_EXTERNAL_ID_LENGTH} characters", value
        )


def _check_prompt(*, required: bool) -> Any:
    def check(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value is None and not required:
            return
        if not isinstance(value, str):
            raise ValidationError(attribute.name, "must be a string", value)
        if required and not value.strip():
            raise ValidationError(attribute.name, "must have some non-space text", value)
        if len(value) > MAX_PROMPT_LENGTH:
            raise ValidationError(
                attribute.name, f"must be at most {MAX_PROMPT_LENGTH} characters", value
            )

    return check


def _check_cfg_scale(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError("cfg_scale", "must be a number from 0 to 1", value)
    # Compared without converting to float: 10**400 is an int no float can hold.
    if value != value or not 0 <= value <= 1:
        raise ValidationError("cfg_scale", "must be a number from 0 to 1", value)


def _check_callback_url(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not is_http_url(value, for_callbacks=True):
        raise ValidationError(
            attribute.name,
            "must be an absolute http(s) URL with a valid port, no user:password@ and no #fragment",
            value,
        )


def _check_optional_bool(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not isinstance(value, bool):
        raise ValidationError(attribute.name, "must be true or false", value)


@attrs.frozen
class ExtendRequest:
    """One video extension, checked when it is built.

    An empty string for an optional text field (`negative_prompt`, `callback_url`)
    means "not given", as in the endpoint page's own example.

    Raises:
        ValidationError: naming the field, the kind of value given and the rule it broke.
    """

    video_id: str = attrs.field(validator=_check_id)
    #: Required, with some non-space text; at most 2500 characters.
    prompt: str = attrs.field(validator=_check_prompt(required=True))
    negative_prompt: str | None = attrs.field(
        default=None, converter=_empty_is_none, validator=_check_prompt(required=False)
    )
    #: How closely to follow the prompt, from 0 to 1.
    cfg_scale: float | None = attrs.field(default=None, validator=_check_cfg_scale)
    callback_url: str | None = attrs.field(
        default=None, converter=_empty_is_none, validator=_check_callback_url
    )
    #: Your own id for the task; the client makes one up (a UUID) when you leave it out.
    external_task_id: str | None = attrs.field(default=None, validator=_check_id)
    #: Sent as ``watermark_info: {"enabled": ...}``.
    watermark: bool | None = attrs.field(default=None, validator=_check_optional_bool)
    #: The task that made `video_id`, for gateways that ask for it (sent as ``task_id``).
    parent_task_id: str | None = attrs.field(default=None, validator=_check_id)


class TaskStatus(str, enum.Enum):
    """Where a task is in its life. Any status the service adds later reads as UNKNOWN."""

    SUBMITTED = "submitted"
    PROCESSING = "processing"
    SUCCEED = "succeed"
    FAILED = "failed"
    UNKNOWN = "unknown"

    @classmethod
    def parse(cls, raw: str) -> TaskStatus:
        """The status for a service string; strings we do not know give UNKNOWN."""
        return _STATUS_BY_VALUE.get(raw, cls.UNKNOWN)


_STATUS_BY_VALUE: dict[str, TaskStatus] = {status.value: status for status in TaskStatus}


@attrs.frozen
class Video:
    """A video: its id (to extend it again), its URL and its length in seconds."""

    id: str
    url: str
    duration: float
    #: The watermarked copy, when the service made one (``watermark_info`` enabled).
    watermark_url: str | None = None


@attrs.frozen
class Task:
    """One extension task as the service last described it."""

    task_id: str
    status: TaskStatus
    status_message: str = ""
    created_at: datetime | None = None
    updated_at: datetime | None = None
    external_task_id: str | None = None
    parent_video: Video | None = None
    videos: tuple[Video, ...] = ()
    #: The status string exactly as the service sent it (useful when `status` is UNKNOWN);
    #: for a task built by hand, the status's own wire text.
    raw_status: str = attrs.field(
        default=attrs.Factory(lambda task: task.status.value, takes_self=True)
    )
    request_id: str | None = None
    #: Units billed for the task (``final_unit_deduction``), once the service says.
    units_deducted: float | None = None

    @property
    def expires_at(self) -> datetime | None:
        """When Kling deletes the task's results (`created_at` + 30 days); None without
        `created_at`."""
        return None if self.created_at is None else self.created_at + RESULT_LIFETIME

    @property
    def is_terminal(self) -> bool:
        """True once the task has succeeded or failed."""
        return self.status in (TaskStatus.SUCCEED, TaskStatus.FAILED)

    @property
    def succeeded(self) -> bool:
        """True if the task finished with a result."""
        return self.status is TaskStatus.SUCCEED

    @property
    def failed(self) -> bool:
        """True if the task finished without a result."""
        return self.status is TaskStatus.FAILED


#: Statuses of a resource pack, as the service writes them.
PACK_STATUSES = ("toBeOnline", "online", "expired", "runout")


@attrs.frozen
class ResourcePack:
    """One of the account's resource packs (``GET /account/costs``, official API).

    The service may report `remaining` up to 12 hours late.
    """

    name: str
    id: str
    #: The kind of pack as the service names it (e.g. ``decreasing_total``).
    type: str
    total: float
    remaining: float
    #: ``toBeOnline``, ``online``, ``expired`` or ``runout`` (any other string kept as is).
    status: str
    purchased_at: datetime | None = None
    effective_at: datetime | None = None
    expires_at: datetime | None = None

    @property
    def usable(self) -> bool:
        """True when the pack is online and not run out."""
        return self.status == "online" and self.remaining > 0


def _check_positive(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(attribute.name, "must be a number", value)
    if not math.isfinite(value) or value <= 0:
        raise ValidationError(attribute.name, "must be a finite number above 0", value)


def _check_factor(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    _check_positive(instance, attribute, value)
    assert isinstance(value, (int, float))
    if value < 1:
        raise ValidationError(attribute.name, "must be at least 1", value)


def _check_jitter(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValidationError(attribute.name, "must be a number from 0 up to (not) 1", value)


#: How long a wait for a task lasts by default: `wait_for_task`, `extend_and_wait` (their
#: signatures spell it out, and a test holds them to this), a batch item, a chain step.
WAIT_TIMEOUT: Final = 900.0


@attrs.frozen
class PollPolicy:
    """How `wait_for_task` spaces its looks at a task.

    The first look comes after `initial` seconds, each next one `factor` times later, at
    most `max_interval` apart; each interval is spread by up to ±`jitter` (a fraction) so
    that many waiters do not poll in step.
    """

    initial: float = attrs.field(default=2.0, validator=_check_positive)
    factor: float = attrs.field(default=1.5, validator=_check_factor)
    max_interval: float = attrs.field(default=15.0, validator=_check_positive)
    jitter: float = attrs.field(default=0.1, validator=_check_jitter)


#: The poll policy of a client given none; `kling_async.testing.set_testing` swaps in a
#: faster one while test mode is on.
_DEFAULT_POLL = [PollPolicy()]


def default_poll() -> PollPolicy:
    """The poll policy a client uses when it is given none."""
    return _DEFAULT_POLL[0]


def set_default_poll(policy: PollPolicy) -> None:
    """Change `default_poll` (the test mode does)."""
    _DEFAULT_POLL[0] = policy


@attrs.frozen
class BatchProgress:
    """A snapshot of a running batch, handed to `extend_many`'s `on_progress`."""

    #: Items whose task has been created so far.
    submitted: int
    #: Items whose task is created and not yet finished (``wait=True`` only).
    running: int
    #: Items finished without an error.
    succeeded: int
    #: Items finished with an error.
    failed: int
    #: Items read from the input that have no task yet.
    pending: int
    #: How many tasks the account lets run at once right now (lowered by 1303 answers).
    concurrency: int
    #: 1303 answers (account's running-task limit) seen so far.
    throttled: int = 0
    #: Number of input items, when the input has a length.
    total: int | None = None


@attrs.frozen
class BatchResult:
    """The outcome of one item of `extend_many`: its input position, request, task, error."""

    index: int
    request: ExtendRequest
    #: The last state of the task seen (None if no task was created).
    task: Task | None = None
    error: KlingError | None = None

    @property
    def ok(self) -> bool:
        """True when the item finished without an error."""
        return self.error is None and self.task is not None
