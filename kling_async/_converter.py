"""The one cattrs converter: the service's JSON shapes to and from our models.

The wire shape of a task (``task_status``, ``task_info.parent_video``, millisecond
timestamps, durations as strings) is described by private attrs classes that cattrs
structures with full field paths in its errors; `Task` is built from that, and
unstructures back to the same wire shape, so a task read from a journal or printed by
the CLI looks exactly like what the service sends.

The converter is strict where cattrs is lenient by default: a string is never read as
a bool or a number (``"false"`` does not become True), and a bool is never a number.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, TypeVar

import attrs
import cattrs
import cattrs.gen
from cattrs.preconf.orjson import make_converter

from kling_async._models import ExtendRequest, Task, TaskStatus, Video
from kling_async.errors import ResponseFormatError, ValidationError

T = TypeVar("T")

converter = make_converter()


def _strict(kind: type[T], accepts: tuple[type, ...], what: str) -> Callable[[Any, Any], T]:
    def structure(value: Any, _: Any) -> T:
        if isinstance(value, bool) and kind is not bool:
            raise TypeError(f"expected {what}, got bool")
        if not isinstance(value, accepts):
            raise TypeError(f"expected {what}, got {type(value).__name__}")
        return value  # type: ignore[return-value]

    return structure


def _structure_seconds(value: Any, _: Any) -> float:
    # Durations come as strings of seconds ("9.9"); accept plain numbers too.
    if isinstance(value, bool):
        raise TypeError("expected seconds, got bool")
    if isinstance(value, str):
        try:
            seconds = float(value)
        except ValueError:
            raise ValueError(f"expected seconds, got {value!r}") from None
    elif isinstance(value, (int, float)):
        seconds = float(value)
    else:
        raise TypeError(f"expected seconds, got {type(value).__name__}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"expected a non-negative duration, got {value!r}")
    return seconds


converter.register_structure_hook(str, _strict(str, (str,), "a string"))
converter.register_structure_hook(int, _strict(int, (int,), "an integer"))
converter.register_structure_hook(bool, _strict(bool, (bool,), "true or false"))
converter.register_structure_hook(float, _structure_seconds)


@attrs.define
class _WireVideo:
    id: str
    url: str = ""
    duration: float = 0.0


@attrs.define
class _WireTaskInfo:
    parent_video: _WireVideo | None = None
    external_task_id: str | None = None


@attrs.define
class _WireTaskResult:
    videos: list[_WireVideo] | None = None


@attrs.define
class _WireTask:
    task_id: str
    task_status: str
    task_status_msg: str | None = None
    task_info: _WireTaskInfo | None = None
    task_result: _WireTaskResult | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    # Not part of the service's task: the request id of the answer that carried it.
    request_id: str | None = None


def _objects_only(cls: type[T]) -> Callable[[Any, Any], T]:
    # cattrs reads fields with `"name" in value`, which a list or a string also answers:
    # insist on a JSON object so `"task_info": []` is an error, not an empty object.
    generated = cattrs.gen.make_dict_structure_fn(cls, converter)

    def structure(value: Any, kind: Any) -> T:
        if not isinstance(value, dict):
            raise TypeError(f"expected an object, got {type(value).__name__}")
        return generated(value, kind)

    return structure


def _structure_millis(value: Any, _: Any) -> datetime:
    # Timestamps are Unix milliseconds; they become UTC-aware datetimes.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected Unix milliseconds, got {type(value).__name__}")
    try:
        return datetime.fromtimestamp(value / 1000, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        raise ValueError(f"timestamp out of range: {value}") from None


converter.register_structure_hook(datetime, _structure_millis)


def _to_millis(value: datetime | None) -> int | None:
    return None if value is None else round(value.timestamp() * 1000)


for _wire_class in (_WireVideo, _WireTaskInfo, _WireTaskResult, _WireTask):
    converter.register_structure_hook(_wire_class, _objects_only(_wire_class))


def _video(wire: _WireVideo) -> Video:
    return Video(id=wire.id, url=wire.url, duration=wire.duration)


def _structure_task(value: Any, _: Any) -> Task:
    return task_from_wire(converter.structure(value, _WireTask))


def task_from_wire(
    wire: _WireTask, *, request_id: str | None = None, external_task_id: str | None = None
) -> Task:
    """The public `Task` of a structured wire task (defaults fill what the wire lacks)."""
    info = wire.task_info or _WireTaskInfo()
    videos = (wire.task_result.videos if wire.task_result else None) or []
    return Task(
        task_id=wire.task_id,
        status=TaskStatus.parse(wire.task_status),
        status_message=wire.task_status_msg or "",
        created_at=wire.created_at,
        updated_at=wire.updated_at,
        external_task_id=info.external_task_id or external_task_id,
        parent_video=_video(info.parent_video) if info.parent_video else None,
        videos=tuple(_video(v) for v in videos),
        raw_status=wire.task_status,
        request_id=request_id if request_id is not None else wire.request_id,
    )


def _fast_video(value: Any) -> Video | None:
    if type(value) is not dict:
        return None
    video_id, url = value.get("id"), value.get("url", "")
    if type(video_id) is not str or type(url) is not str:
        return None
    return Video(id=video_id, url=url, duration=_structure_seconds(value.get("duration", 0.0), 0))


def _fast_millis(value: Any) -> datetime | None:
    if value is None:
        return None
    if type(value) is not int:
        raise TypeError  # anything else takes the checked path
    return datetime.fromtimestamp(value / 1000, tz=timezone.utc)


def _fast_task(data: dict[str, Any], request_id: str | None, external: str | None) -> Task | None:
    """The common, well-formed task without cattrs' bookkeeping; None for anything else.

    Tasks are parsed on every answer, and this path is about three times faster. It
    accepts only plain shapes and gives up (returns None, so the cattrs path decides,
    with its precise errors) on anything unusual; a Hypothesis test checks that both
    paths agree on every task this one accepts.
    """
    try:
        task_id, status = data["task_id"], data["task_status"]
        message = data.get("task_status_msg")
        info = data.get("task_info")
        info = {} if info is None else info
        result = data.get("task_result")
        result = {} if result is None else result
        if (
            type(task_id) is not str
            or type(status) is not str
            or not (message is None or type(message) is str)
            or type(info) is not dict
            or type(result) is not dict
        ):
            return None
        wire_external = info.get("external_task_id")
        parent = info.get("parent_video")
        wire_videos = result.get("videos")
        wire_videos = [] if wire_videos is None else wire_videos
        wire_request_id = data.get("request_id")
        if (
            not (wire_external is None or type(wire_external) is str)
            or type(wire_videos) is not list
            or not (wire_request_id is None or type(wire_request_id) is str)
        ):
            return None
        parent_video = None if parent is None else _fast_video(parent)
        videos = tuple(_fast_video(v) for v in wire_videos)
        if (parent is not None and parent_video is None) or None in videos:
            return None
        return Task(
            task_id=task_id,
            status=TaskStatus.parse(status),
            status_message=message or "",
            created_at=_fast_millis(data.get("created_at")),
            updated_at=_fast_millis(data.get("updated_at")),
            external_task_id=wire_external or external,
            parent_video=parent_video,
            videos=videos,  # type: ignore[arg-type]  # None was ruled out above
            raw_status=status,
            request_id=request_id if request_id is not None else wire_request_id,
        )
    except (KeyError, TypeError, ValueError, OverflowError, OSError):
        return None


def _unstructure_video(video: Video) -> dict[str, Any]:
    return {"id": video.id, "url": video.url, "duration": str(video.duration)}


def _unstructure_task(task: Task) -> dict[str, Any]:
    info: dict[str, Any] = {}
    if task.parent_video is not None:
        info["parent_video"] = _unstructure_video(task.parent_video)
    if task.external_task_id is not None:
        info["external_task_id"] = task.external_task_id
    document: dict[str, Any] = {
        "task_id": task.task_id,
        "task_status": task.raw_status or task.status.value,
        "task_status_msg": task.status_message,
        "task_info": info,
        "task_result": {"videos": [_unstructure_video(v) for v in task.videos]},
        "created_at": _to_millis(task.created_at),
        "updated_at": _to_millis(task.updated_at),
    }
    if task.request_id is not None:
        document["request_id"] = task.request_id
    return {key: value for key, value in document.items() if value is not None}


def _structure_request(value: Any, _: Any) -> ExtendRequest:
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, got {type(value).__name__}")
    fields = {a.name for a in attrs.fields(ExtendRequest)}
    for key in value:
        if key not in fields:  # a typo must not silently drop a setting
            raise ValidationError(str(key), "is not a field of an extension request")
    return ExtendRequest(**value)


_structure_wire_task = converter.get_structure_hook(_WireTask)
converter.register_structure_hook(Task, _structure_task)
converter.register_unstructure_hook(Task, _unstructure_task)
converter.register_structure_hook(ExtendRequest, _structure_request)
converter.register_unstructure_hook(
    ExtendRequest,
    lambda request: {
        a.name: getattr(request, a.name)
        for a in attrs.fields(ExtendRequest)
        if getattr(request, a.name) is not None
    },
)


def _error_path(error: Exception, root: str) -> str:
    messages = cattrs.transform_error(error, path=root)
    for message in messages:
        if " @ " in message:
            return message.rsplit(" @ ", 1)[1]
    return root


def _error_reason(error: Exception, root: str) -> str:
    leaf: BaseException = error
    while isinstance(leaf, cattrs.BaseValidationError) and leaf.exceptions:
        leaf = leaf.exceptions[0]
    if isinstance(leaf, (TypeError, ValueError)) and str(leaf):
        return str(leaf)
    messages = cattrs.transform_error(error, path=root)
    return messages[0].rsplit(" @ ", 1)[0] if messages else type(leaf).__name__


def _format_error(error: Exception, root: str) -> ResponseFormatError:
    """A cattrs failure as our error, naming the path of the first bad field."""
    return ResponseFormatError(
        f"unexpected answer ({_error_reason(error, root)})", path=_error_path(error, root)
    )


def parse_task(
    data: Any,
    *,
    request_id: str | None = None,
    root: str = "data",
    external_task_id: str | None = None,
) -> Task:
    """A `Task` from an answer's ``data``; `request_id` is the envelope's.

    `external_task_id` fills in the id we sent when the answer leaves it out.
    """
    if not isinstance(data, dict):
        raise ResponseFormatError(
            f"unexpected answer (expected a task object, got {type(data).__name__})", path=root
        )
    task = _fast_task(data, request_id, external_task_id)
    if task is not None:
        return task
    try:
        wire = _structure_wire_task(data, _WireTask)
    except (cattrs.BaseValidationError, TypeError, ValueError, AttributeError) as error:
        raise _format_error(error, root) from None
    return task_from_wire(wire, request_id=request_id, external_task_id=external_task_id)


def parse_task_list(data: Any, *, request_id: str | None = None) -> list[Task]:
    """The tasks of one page of the list call."""
    if not isinstance(data, list):
        raise ResponseFormatError(
            f"unexpected answer (expected a list of tasks, got {type(data).__name__})",
            path="data",
        )
    return [
        parse_task(item, request_id=request_id, root=f"data[{i}]") for i, item in enumerate(data)
    ]
