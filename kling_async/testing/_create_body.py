"""The create body as the service reads it: wire names, checked field by field.

The simulator is an oracle for the client, so this module shares nothing with the
client's models or converter: it reads the JSON object it received by the names of the
wire format (`video_id`, `prompt`, `negative_prompt`, `cfg_scale`, `callback_url`,
`external_task_id`, `watermark_info.enabled`, `task_id`) and applies the service's
rules itself. A bug in the client's mapping then shows up as a refused create (400,
code 1201, the message naming the field) instead of passing unseen.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse
from collections.abc import Callable
from typing import Any, Final

__all__ = ["CREATE_FIELDS", "CreateBody", "read_create"]

MAX_PROMPT_LENGTH: Final = 2500
"""The longest prompt (and negative prompt) accepted, in characters."""

MAX_ID_LENGTH: Final = 256
"""The longest id (`video_id`, `external_task_id`, `task_id`) accepted."""

_SHOWN_TEXT: Final = 40  # longer texts are shown by their length (prompts are private)
_WHITESPACE: Final = re.compile(r"\s")
_USERINFO: Final = re.compile(r"(?<=//)[^/@\s]*@")


@dataclasses.dataclass(frozen=True, slots=True)
class CreateBody:
    """What a valid create body asks for (an empty optional text reads as not given).

    Attributes:
        video_id: the video to extend.
        prompt: the prompt.
        negative_prompt: `negative_prompt`, if given.
        cfg_scale: `cfg_scale`, if given.
        callback_url: where to POST status changes, if given.
        external_task_id: the caller's id for the task, if given.
        watermark: `watermark_info.enabled`, if given.
        parent_task_id: the body's `task_id` (the task that made `video_id`), if given.
    """

    video_id: str
    prompt: str
    negative_prompt: str | None = None
    cfg_scale: float | None = None
    callback_url: str | None = None
    external_task_id: str | None = None
    watermark: bool | None = None
    parent_task_id: str | None = None


class _BadField(Exception):
    """A field of the body broke a rule; its text is the 1201 answer's message."""

    def __init__(self, field: str, rule: str, value: object = ...) -> None:
        got = "" if value is ... else f" (got {_shown(value)})"
        super().__init__(f"{field}: {rule}{got}")


def _shown(value: object) -> str:
    """A received value as a message shows it: numbers and short texts as they are, a long
    text by its length, a URL without its ``user:password@``, anything else by its JSON kind."""
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, str):
        if len(value) > _SHOWN_TEXT:
            return f"a text of {len(value)} characters"
        return repr(_USERINFO.sub("***@", value))
    return type(value).__name__


# -- one check per wire field -----------------------------------------------------------


def _id(field: str, value: Any, *, required: bool) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise _BadField(field, "must be a string", value)
    if not value or _WHITESPACE.search(value) is not None:
        raise _BadField(field, "must be non-empty with no whitespace", value)
    if len(value) > MAX_ID_LENGTH:
        raise _BadField(field, f"must be at most {MAX_ID_LENGTH} characters", value)
    return value


def _prompt(field: str, value: Any, *, required: bool) -> str | None:
    if not required and value in (None, ""):
        return None
    if not isinstance(value, str):
        raise _BadField(field, "must be a string", value)
    if required and not value.strip():
        raise _BadField(field, "must have some non-space text", value)
    if len(value) > MAX_PROMPT_LENGTH:
        raise _BadField(field, f"must be at most {MAX_PROMPT_LENGTH} characters", value)
    return value


def _cfg_scale(field: str, value: Any) -> float | None:
    if value is None:
        return None
    # A JSON number: bool is an int to Python but `true` to JSON. NaN fails the range.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _BadField(field, "must be a number from 0 to 1", value)
    if value != value or not 0 <= value <= 1:
        raise _BadField(field, "must be a number from 0 to 1", value)
    return float(value)


def _callback_url(field: str, value: Any) -> str | None:
    if value in (None, ""):
        return None
    rule = "must be an absolute http(s) URL with a valid port, no user:password@ and no #fragment"
    if not isinstance(value, str) or _WHITESPACE.search(value) is not None or "#" in value:
        raise _BadField(field, rule, value)
    try:
        parts = urllib.parse.urlsplit(value)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a port outside 0-65535
    except ValueError:
        raise _BadField(field, rule, value) from None
    if parts.scheme not in ("http", "https") or not host:
        raise _BadField(field, rule, value)
    if parts.username is not None or parts.password is not None:
        raise _BadField(field, rule, value)
    return value


def _watermark(field: str, value: Any) -> bool:
    # Unlike the other optional fields, `null` is refused here: the object is the field.
    rule = 'must be {"enabled": true|false}'
    if not isinstance(value, dict) or set(value) != {"enabled"}:
        raise _BadField(field, rule, value)
    enabled = value["enabled"]
    if not isinstance(enabled, bool):
        raise _BadField(field, rule, value)
    return enabled


_Check = Callable[[str, Any], Any]

#: Wire name -> (name in `CreateBody`, check), in the order the service reads them.
_FIELDS: Final[dict[str, tuple[str, _Check]]] = {
    "video_id": ("video_id", lambda f, v: _id(f, v, required=True)),
    "prompt": ("prompt", lambda f, v: _prompt(f, v, required=True)),
    "negative_prompt": ("negative_prompt", lambda f, v: _prompt(f, v, required=False)),
    "cfg_scale": ("cfg_scale", _cfg_scale),
    "callback_url": ("callback_url", _callback_url),
    "external_task_id": ("external_task_id", lambda f, v: _id(f, v, required=False)),
    "watermark_info": ("watermark", _watermark),
    "task_id": ("parent_task_id", lambda f, v: _id(f, v, required=False)),
}

CREATE_FIELDS: Final[tuple[str, ...]] = tuple(_FIELDS)
"""Every field name a create body may have, as on the wire."""

_REQUIRED: Final = ("video_id", "prompt")


def read_create(payload: dict[str, Any]) -> CreateBody | str:
    """What a create body (a JSON object) asks for, or the problem with it, naming the field.

    An unknown name is refused (a client that misspells a field would otherwise lose
    the setting unseen), as is a missing `video_id` or `prompt` and any value that breaks
    its field's rule.
    """
    try:
        return _read(payload)
    except _BadField as problem:
        return str(problem)


def _read(payload: dict[str, Any]) -> CreateBody:
    for name in payload:
        if name not in _FIELDS:
            raise _BadField(str(name), f"unknown field (the fields are {', '.join(CREATE_FIELDS)})")
    for name in _REQUIRED:
        if name not in payload:
            raise _BadField(name, "is required")
    values = {
        attribute: check(name, payload[name])
        for name, (attribute, check) in _FIELDS.items()
        if name in payload
    }
    return CreateBody(**values)
