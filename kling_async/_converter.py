"""The one cattrs converter: every JSON shape of the service to and from our models.

Registered on it, and nowhere else:

- `ExtendRequest` ⇄ the create body: ``watermark`` is sent as ``watermark_info:
  {"enabled": ...}``, ``parent_task_id`` as ``task_id``, None fields are left out.
  Structuring a create body gives the `ExtendRequest` (validated; the simulator checks
  what it receives this way).
- `Task` ⇄ the service's task: ``task_status`` → `status`, ``task_info.parent_video``,
  millisecond timestamps → UTC datetimes, durations as strings → floats,
  ``final_unit_deduction`` (a string or a number) → `units_deducted`. Both callback
  formats structure to a `Task` too: the task object itself, and the newer
  ``id``/``status``/``outputs`` one.
- `ResourcePack` from ``/account/costs``'s ``resource_pack_subscribe_infos`` items.

Tasks are parsed on every answer, so the `Task` hook is written by hand rather than
generated: it is the only task parser, it is strict where cattrs is lenient by default
(``"false"`` is never a bool, a bool is never a number, a list is never an object), and
it names the path of the first bad field (``data.task_result.videos[0].duration``).
docs/performance.md has the measurement that justifies writing it by hand.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Final

import attrs

from kling_async._models import ExtendRequest, ResourcePack, Task, TaskStatus, Video
from kling_async.errors import ResponseFormatError, ValidationError

__all__ = [
    "REQUEST_FIELDS",
    "converter",
    "parse_callback",
    "parse_resource_packs",
    "parse_task",
    "parse_task_list",
    "request_body",
    "request_from_fields",
    "unknown_and_missing_fields",
]

if TYPE_CHECKING:
    from cattrs.preconf.orjson import OrjsonConverter

    #: The converter (built on first use: importing cattrs is not free, and the request
    #: path needs only `request_body` and `parse_task`).
    converter: OrjsonConverter

#: The newer callback format's statuses that differ from the task object's.
_NEW_STATUSES: Final = {"succeeded": "succeed"}
_REQUEST_FIELDS: Final = tuple(a.name for a in attrs.fields(ExtendRequest))
_REQUIRED_FIELDS: Final = ("video_id", "prompt")
#: Every field of a request by name (a batch file's keys and columns).
REQUEST_FIELDS: Final = _REQUEST_FIELDS


# -- the create body --------------------------------------------------------------------


def request_body(request: ExtendRequest) -> dict[str, Any]:
    """The JSON body of a create request (None fields left out)."""
    body: dict[str, Any] = {"video_id": request.video_id, "prompt": request.prompt}
    if request.negative_prompt is not None:
        body["negative_prompt"] = request.negative_prompt
    if request.cfg_scale is not None:
        body["cfg_scale"] = request.cfg_scale
    if request.callback_url is not None:
        body["callback_url"] = request.callback_url
    if request.external_task_id is not None:
        body["external_task_id"] = request.external_task_id
    if request.watermark is not None:
        body["watermark_info"] = {"enabled": request.watermark}
    if request.parent_task_id is not None:
        body["task_id"] = request.parent_task_id
    return body


def _request_from_body(body: Any, _: Any = None) -> ExtendRequest:
    """The `ExtendRequest` a create body describes (the inverse of `request_body`)."""
    if not isinstance(body, dict):
        raise ValidationError("body", "must be a JSON object", body)
    fields = dict(body)
    if "watermark_info" in fields:
        info = fields.pop("watermark_info")
        if not isinstance(info, dict) or set(info) != {"enabled"}:
            raise ValidationError("watermark_info", 'must be {"enabled": true|false}', info)
        if not isinstance(info["enabled"], bool):
            raise ValidationError("watermark_info", 'must be {"enabled": true|false}', info)
        fields["watermark"] = info["enabled"]
    if "task_id" in fields:
        fields["parent_task_id"] = fields.pop("task_id")
    for wire_only in ("watermark", "parent_task_id"):
        if wire_only in body:  # the wire names are the only names on the wire
            raise ValidationError(wire_only, "is not a field of the create body")
    return request_from_fields(fields)


def request_from_fields(fields: Mapping[str, Any]) -> ExtendRequest:
    """An `ExtendRequest` from its field names (a row of a batch file, say).

    Raises:
        ValidationError: an unknown field (a typo must not silently drop a setting), a
            missing required one, or a value that breaks a rule.
    """
    unknown, missing = unknown_and_missing_fields(fields)
    if unknown:
        raise ValidationError(
            str(unknown[0]), f"unknown field (the fields are {', '.join(_REQUEST_FIELDS)})"
        )
    if missing:
        raise ValidationError(missing[0], "is required")
    return ExtendRequest(**fields)


def unknown_and_missing_fields(names: Iterable[Any]) -> tuple[list[Any], list[str]]:
    """The names that are no field of a request, and the required fields not named."""
    given = list(names)
    unknown = [name for name in given if name not in _REQUEST_FIELDS]
    missing = [name for name in _REQUIRED_FIELDS if name not in given]
    return unknown, missing


# -- tasks ------------------------------------------------------------------------------


#: Where a field is: ``("data", "task_result", "videos", 0, "duration")``. Paths are
#: joined into text only when a field is bad: formatting them for every field of every
#: answer cost more than the rest of the parse.
_Where = tuple[Any, ...]


class _Bad(Exception):
    """A field of the wrong shape: where, and why."""

    def __init__(self, where: _Where, reason: str) -> None:
        self.where = where
        self.reason = reason

    @property
    def path(self) -> str:
        root, *rest = self.where
        return str(root) + "".join(
            f"[{part}]" if isinstance(part, int) else f".{part}" for part in rest
        )


def _kind(value: object) -> str:
    return "bool" if isinstance(value, bool) else type(value).__name__


def _text(value: Any, where: _Where, *, optional: bool = True) -> str | None:
    if type(value) is str or (value is None and optional):
        return value
    raise _Bad(where, f"expected a string, got {_kind(value)}")


def _object(value: Any, where: _Where) -> dict[str, Any]:
    if value is None:
        return {}
    if type(value) is dict:
        return value
    raise _Bad(where, f"expected an object, got {_kind(value)}")


def _seconds(value: Any, where: _Where) -> float:
    # Durations come as strings of seconds ("9.9"); plain numbers are accepted too.
    if type(value) is str:
        try:
            seconds = float(value)
        except ValueError:
            raise _Bad(where, f"expected seconds, got {value!r}") from None
    elif type(value) in (int, float):
        seconds = float(value)
    else:
        raise _Bad(where, f"expected seconds, got {_kind(value)}")
    if not 0 <= seconds < float("inf"):
        raise _Bad(where, f"expected a non-negative duration, got {value!r}")
    return seconds


def _millis(value: Any, where: _Where) -> datetime | None:
    # Timestamps are Unix milliseconds; they become UTC-aware datetimes.
    if value is None:
        return None
    if type(value) not in (int, float):
        raise _Bad(where, f"expected Unix milliseconds, got {_kind(value)}")
    try:
        return datetime.fromtimestamp(value / 1000, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        raise _Bad(where, f"timestamp out of range: {value}") from None


_INFINITY: Final = float("inf")
#: Millisecond timestamps below this (year 9999) convert without a range error.
_MAX_MILLIS: Final = 253_402_300_799_000


def _from_millis(value: int) -> datetime:
    return datetime.fromtimestamp(value / 1000, tz=timezone.utc)


def _required(data: dict[str, Any], key: str, where: _Where) -> Any:
    if key not in data:
        raise _Bad((*where, key), "required field missing")
    return data[key]


def _video(value: Any, *where: Any) -> Video:
    if type(value) is not dict:
        raise _Bad(where, f"expected an object, got {_kind(value)}")
    video_id: Any = value.get("id")
    if type(video_id) is not str:
        _text(_required(value, "id", where), (*where, "id"), optional=False)
    url = value.get("url", "")
    if type(url) is not str:
        _text(url, (*where, "url"), optional=False)
    duration = value.get("duration", 0.0)
    try:
        seconds = float(duration) if type(duration) is str else -1.0
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < _INFINITY:  # anything but a plain string of seconds
        seconds = _seconds(duration, (*where, "duration"))
    watermark_url = value.get("watermark_url")
    if watermark_url is not None and type(watermark_url) is not str:
        _text(watermark_url, (*where, "watermark_url"))
    return Video(id=video_id, url=url, duration=seconds, watermark_url=watermark_url or None)


def _units(value: Any, where: _Where) -> float | None:
    # ``final_unit_deduction`` comes as a string ("5") or a number; "" means not yet.
    if value is None or value == "":
        return None
    if type(value) is str:
        try:
            units = float(value)
        except ValueError:
            raise _Bad(where, f"expected a number of units, got {value!r}") from None
    elif type(value) in (int, float):
        units = float(value)
    else:
        raise _Bad(where, f"expected a number of units, got {_kind(value)}")
    if not 0 <= units < _INFINITY:
        raise _Bad(where, f"expected a non-negative number of units, got {value!r}")
    return units


def _task(
    data: Any, root: str, request_id: str | None = None, external_task_id: str | None = None
) -> Task:
    # The common, well-formed answer takes the inline checks; a field that fails one is
    # looked at again by the helper, which raises with its path.
    if type(data) is not dict:
        raise _Bad((root,), f"expected a task object, got {_kind(data)}")
    if "task_id" not in data and "id" in data and "status" in data:
        data = _from_new_callback(data, (root,))
    get = data.get
    task_id = get("task_id")
    if type(task_id) is not str:
        _text(_required(data, "task_id", (root,)), (root, "task_id"), optional=False)
    status = get("task_status")
    if type(status) is not str:
        _text(_required(data, "task_status", (root,)), (root, "task_status"), optional=False)
    message = get("task_status_msg")
    if message is not None and type(message) is not str:
        _text(message, (root, "task_status_msg"))
    info = get("task_info")
    info = {} if info is None else info
    if type(info) is not dict:
        _object(info, (root, "task_info"))
    result = get("task_result")
    result = {} if result is None else result
    if type(result) is not dict:
        _object(result, (root, "task_result"))
    external = info.get("external_task_id")
    if external is not None and type(external) is not str:
        _text(external, (root, "task_info", "external_task_id"))
    parent = info.get("parent_video")
    raw_videos = result.get("videos")
    if raw_videos is None:
        raw_videos = ()
    elif type(raw_videos) is not list:
        raise _Bad((root, "task_result", "videos"), f"expected a list, got {_kind(raw_videos)}")
    wire_request_id = get("request_id")
    if wire_request_id is not None and type(wire_request_id) is not str:
        _text(wire_request_id, (root, "request_id"))
    created_at = get("created_at")
    updated_at = get("updated_at")
    units = get("final_unit_deduction")
    return Task(
        task_id=task_id,
        status=TaskStatus.parse(status),
        status_message=message or "",
        created_at=_from_millis(created_at)
        if type(created_at) is int and 0 <= created_at < _MAX_MILLIS
        else _millis(created_at, (root, "created_at")),
        updated_at=_from_millis(updated_at)
        if type(updated_at) is int and 0 <= updated_at < _MAX_MILLIS
        else _millis(updated_at, (root, "updated_at")),
        external_task_id=external or external_task_id,
        parent_video=None if parent is None else _video(parent, root, "task_info", "parent_video"),
        videos=tuple(
            [_video(v, root, "task_result", "videos", i) for i, v in enumerate(raw_videos)]
        ),
        raw_status=status,
        request_id=request_id if request_id is not None else wire_request_id,
        units_deducted=None if units is None else _units(units, (root, "final_unit_deduction")),
    )


def _from_new_callback(data: Mapping[str, Any], where: _Where) -> dict[str, Any]:
    """The newer callback format (``id``, ``status``, ``outputs``...) as a task object."""
    status = data["status"]
    task: dict[str, Any] = {
        "task_id": data["id"],
        "task_status": _NEW_STATUSES.get(status, status) if type(status) is str else status,
    }
    renames = {"message": "task_status_msg", "create_time": "created_at"}
    renames["update_time"] = "updated_at"
    renames["final_unit_deduction"] = "final_unit_deduction"
    task.update((new, data[old]) for old, new in renames.items() if data.get(old) is not None)
    if data.get("external_id") is not None:
        task["task_info"] = {"external_task_id": data["external_id"]}
    outputs = data.get("outputs")
    if outputs is not None:
        if type(outputs) is not list:
            raise _Bad((*where, "outputs"), f"expected a list, got {_kind(outputs)}")
        task["task_result"] = {
            "videos": [
                {key: output[key] for key in _VIDEO_KEYS if key in output}
                if type(output) is dict
                else output  # not an object: the task parser names it
                for output in outputs
                if type(output) is not dict or output.get("type", "video") == "video"
            ]
        }
    return task


_VIDEO_KEYS: Final = ("id", "url", "watermark_url", "duration")


def _unstructure_video(video: Video) -> dict[str, Any]:
    document = {"id": video.id, "url": video.url, "duration": str(video.duration)}
    if video.watermark_url is not None:
        document["watermark_url"] = video.watermark_url
    return document


def _millis_of(value: datetime | None) -> int | None:
    return None if value is None else round(value.timestamp() * 1000)


def _unstructure_task(task: Task) -> dict[str, Any]:
    info: dict[str, Any] = {}
    if task.parent_video is not None:
        info["parent_video"] = _unstructure_video(task.parent_video)
    if task.external_task_id is not None:
        info["external_task_id"] = task.external_task_id
    document: dict[str, Any] = {
        "task_id": task.task_id,
        "task_status": task.raw_status,
        "task_status_msg": task.status_message,
        "task_info": info,
        "task_result": {"videos": [_unstructure_video(v) for v in task.videos]},
        "created_at": _millis_of(task.created_at),
        "updated_at": _millis_of(task.updated_at),
        "request_id": task.request_id,
        "final_unit_deduction": None if task.units_deducted is None else f"{task.units_deducted:g}",
    }
    return {key: value for key, value in document.items() if value is not None}


def _structure_task(data: Any, _: Any) -> Task:
    return parse_task(data)


def __getattr__(name: str) -> Any:
    if name != "converter":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from cattrs.preconf.orjson import make_converter

    made = make_converter()
    made.register_unstructure_hook(ExtendRequest, request_body)
    made.register_structure_hook(ExtendRequest, _request_from_body)
    made.register_unstructure_hook(Task, _unstructure_task)
    made.register_structure_hook(Task, _structure_task)
    globals()["converter"] = made
    return made


def parse_task(
    data: Any,
    *,
    request_id: str | None = None,
    root: str = "data",
    external_task_id: str | None = None,
) -> Task:
    """A `Task` from an answer's ``data`` (or a callback body, with ``root="body"``).

    `request_id` is the envelope's; `external_task_id` fills in the id we sent when the
    answer leaves it out.

    Raises:
        ResponseFormatError: a field of the wrong shape, naming its path; an envelope
            with no ``data`` at all names no path: it is transient, as a garbled body is.
    """
    if data is None and root == "data":
        raise ResponseFormatError("the answer's envelope holds no task (data is null)")
    try:
        return _task(data, root, request_id, external_task_id)
    except _Bad as bad:
        raise ResponseFormatError(f"unexpected answer ({bad.reason})", path=bad.path) from None


def parse_callback(document: Any) -> Task:
    """A `Task` from a decoded callback body, in either callback format.

    Raises:
        ResponseFormatError: not an object, or not a task (the path is named).
    """
    if (
        type(document) is dict
        and "task_id" not in document
        and ("id" not in document or "status" not in document)
    ):
        raise ResponseFormatError(
            "callback body is not a task (no task_id, and no id and status)", path="body"
        )
    return parse_task(document, root="body")


def parse_task_list(data: Any, *, request_id: str | None = None) -> list[Task]:
    """The tasks of one page of the list call."""
    if type(data) is not list:
        raise ResponseFormatError(
            f"unexpected answer (expected a list of tasks, got {_kind(data)})", path="data"
        )
    return [
        parse_task(item, request_id=request_id, root=f"data[{i}]") for i, item in enumerate(data)
    ]


# -- resource packs ---------------------------------------------------------------------


def _quantity(value: Any, where: _Where) -> float:
    if type(value) is str:
        try:
            return float(value)
        except ValueError:
            raise _Bad(where, f"expected a quantity, got {value!r}") from None
    if type(value) in (int, float):
        return float(value)
    raise _Bad(where, f"expected a quantity, got {_kind(value)}")


def _pack(item: Any, where: _Where) -> ResourcePack:
    if type(item) is not dict:
        raise _Bad(where, f"expected an object, got {_kind(item)}")

    def text(key: str) -> str:
        value = _text(item.get(key), (*where, key))
        return "" if value is None else value

    pack_id = item.get("resource_pack_id")
    if type(pack_id) is int:  # an id written as a number is still an id
        pack_id = str(pack_id)
    return ResourcePack(
        name=text("resource_pack_name"),
        id=_text(pack_id, (*where, "resource_pack_id")) or "",
        type=text("resource_pack_type"),
        total=_quantity(item.get("total_quantity"), (*where, "total_quantity")),
        remaining=_quantity(item.get("remaining_quantity"), (*where, "remaining_quantity")),
        status=text("status"),
        purchased_at=_millis(item.get("purchase_time"), (*where, "purchase_time")),
        effective_at=_millis(item.get("effective_time"), (*where, "effective_time")),
        expires_at=_millis(item.get("invalid_time"), (*where, "invalid_time")),
    )


def _packs(data: Any) -> list[ResourcePack]:
    where = ("data", "resource_pack_subscribe_infos")
    infos = _object(data, ("data",)).get(where[1])
    if infos is None:
        return []
    if type(infos) is not list:
        raise _Bad(where, f"expected a list, got {_kind(infos)}")
    return [_pack(item, (*where, i)) for i, item in enumerate(infos)]


def parse_resource_packs(data: Any) -> list[ResourcePack]:
    """The packs of an ``/account/costs`` answer's ``data``.

    Raises:
        ResponseFormatError: a field of the wrong shape, naming its path.
    """
    try:
        return _packs(data)
    except _Bad as bad:
        raise ResponseFormatError(f"unexpected answer ({bad.reason})", path=bad.path) from None
