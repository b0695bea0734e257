"""The public data types: requests, tasks, videos, batch results and the poll policy.

All are frozen attrs classes with slots. `ExtendRequest` checks its fields when it is
built, so a bad request fails in the caller's code, before anything is sent.
"""

from __future__ import annotations

import enum
import math
from datetime import datetime
from typing import Any

import attrs

from kling_async import _protocol
from kling_async._checks import has_whitespace, is_http_url
from kling_async.errors import KlingError, ValidationError

__all__ = ["BatchResult", "ExtendRequest", "PollPolicy", "Task", "TaskStatus", "Video"]

#: The longest prompt (and negative prompt) the service accepts, in characters.
MAX_PROMPT_LENGTH = 2500


def _check_text(max_length: int | None, *, non_blank: bool) -> Any:
    def check(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value is None and attribute.default is None:
            return
        if not isinstance(value, str):
            raise ValidationError(attribute.name, "must be a string", value)
        if non_blank and (not value or has_whitespace(value)):
            raise ValidationError(attribute.name, "must be non-empty with no whitespace", value)
        if max_length is not None and len(value) > max_length:
            raise ValidationError(attribute.name, f"must be at most {max_length} characters", value)

    return check


def _check_cfg_scale(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError("cfg_scale", "must be a number from 0 to 1", value)
    if math.isnan(value) or not 0 <= value <= 1:
        raise ValidationError("cfg_scale", "must be a number from 0 to 1", value)


def _check_url(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not is_http_url(value):
        raise ValidationError(attribute.name, "must be an absolute http(s) URL", value)


def _check_optional_bool(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not isinstance(value, bool):
        raise ValidationError(attribute.name, "must be true or false", value)


@attrs.frozen
class ExtendRequest:
    """One video extension, checked when it is built.

    Raises:
        ValidationError: naming the field, the kind of value given and the rule it broke.
    """

    video_id: str = attrs.field(validator=_check_text(None, non_blank=True))
    #: Required by the gateways' schema; at most 2500 characters (may be empty).
    prompt: str = attrs.field(validator=_check_text(MAX_PROMPT_LENGTH, non_blank=False))
    negative_prompt: str | None = attrs.field(
        default=None, validator=_check_text(MAX_PROMPT_LENGTH, non_blank=False)
    )
    #: How closely to follow the prompt, from 0 to 1.
    cfg_scale: float | None = attrs.field(default=None, validator=_check_cfg_scale)
    callback_url: str | None = attrs.field(default=None, validator=_check_url)
    #: Your own id for the task; the client makes one up (a UUID) when you leave it out.
    external_task_id: str | None = attrs.field(
        default=None, validator=_check_text(256, non_blank=True)
    )
    #: Sent as ``watermark_info: {"enabled": ...}``.
    watermark: bool | None = attrs.field(default=None, validator=_check_optional_bool)
    #: The task that made `video_id`, for gateways that ask for it (sent as ``task_id``).
    parent_task_id: str | None = attrs.field(
        default=None, validator=_check_text(None, non_blank=True)
    )

    def to_body(self) -> dict[str, Any]:
        """The JSON body of the create request (None fields left out)."""
        return _protocol.create_body(
            video_id=self.video_id,
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            cfg_scale=self.cfg_scale,
            callback_url=self.callback_url,
            external_task_id=self.external_task_id,
            watermark=self.watermark,
            parent_task_id=self.parent_task_id,
        )


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
    #: The status string exactly as the service sent it (useful when `status` is UNKNOWN).
    raw_status: str = ""
    request_id: str | None = None

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
