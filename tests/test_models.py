"""Models and the converter: validation at the boundaries, sample bodies, strict parsing."""

from __future__ import annotations

import json
import math
import pickle
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kling_async import (
    BatchResult,
    ExtendRequest,
    PollPolicy,
    ResponseFormatError,
    Task,
    TaskStatus,
    ValidationError,
    Video,
    _protocol,
)
from kling_async._converter import converter, parse_task, parse_task_list, request_body
from kling_async.errors import APIStatusError, InsufficientBalanceError, RateLimitError

SAMPLES = Path(__file__).parent / "samples"


def sample(name: str) -> Any:
    return orjson.loads((SAMPLES / name).read_bytes())


# -- samples -----------------------------------------------------------------------------


def test_query_succeed_sample() -> None:
    body = sample("query-succeed.json")
    task = parse_task(body["data"], request_id=body["request_id"])
    assert task.task_id == "828006748715380777"
    assert task.status is TaskStatus.SUCCEED and task.succeeded and task.is_terminal
    assert task.external_task_id == "batch-7f3a-0001"
    assert task.parent_video == Video(
        id="743211632612511839",
        url="https://cdn.example.com/bs2/upload-ylab-stunt/743211632612511839.mp4",
        duration=5.1,
    )
    assert task.videos[0].duration == 9.9
    assert task.videos[0].id == "828006748715380778"
    assert task.created_at == datetime(2024, 8, 4, 11, 5, 57, 708000, tzinfo=timezone.utc)
    assert task.request_id == "Cl58rmgHRLsAAAAABFV6lg"


def test_query_failed_sample() -> None:
    task = parse_task(sample("query-failed.json")["data"])
    assert task.failed and task.is_terminal and not task.succeeded
    assert task.status_message == "Failure to pass the risk control system"
    assert task.videos == ()


def test_create_samples() -> None:
    gateway = parse_task(sample("create-gateway.json")["data"])
    assert gateway.status is TaskStatus.SUBMITTED and not gateway.is_terminal
    assert gateway.external_task_id is None and gateway.parent_video is None
    official = parse_task(sample("create-official.json")["data"])
    assert official.external_task_id == "batch-7f3a-0001"


def test_list_sample() -> None:
    tasks = parse_task_list(sample("list.json")["data"], request_id="b1c2d3")
    assert [t.status for t in tasks] == [TaskStatus.PROCESSING, TaskStatus.SUCCEED]
    assert tasks[1].videos[0].duration == 10.1
    assert all(t.request_id == "b1c2d3" for t in tasks)


@pytest.mark.parametrize(
    ("name", "cls", "code"),
    [
        ("error-1303.json", RateLimitError, 1303),
        ("error-1102.json", InsufficientBalanceError, 1102),
    ],
)
def test_error_samples(name: str, cls: type[APIStatusError], code: int) -> None:
    with pytest.raises(cls) as caught:
        _protocol.decode_envelope(429, {}, (SAMPLES / name).read_bytes())
    assert caught.value.code == code
    assert _protocol.is_retryable(caught.value) is (code == 1303)


def test_unknown_status_is_kept_raw() -> None:
    task = parse_task({"task_id": "1", "task_status": "queued"})
    assert task.status is TaskStatus.UNKNOWN
    assert task.raw_status == "queued"
    assert not task.is_terminal


def test_unknown_fields_are_ignored() -> None:
    task = parse_task({"task_id": "1", "task_status": "submitted", "new_field": {"x": [1]}})
    assert task.task_id == "1"


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"task_id": 1, "task_status": "succeed"}, "data.task_id"),
        ({"task_status": "succeed"}, "data.task_id"),
        ({"task_id": "1", "task_status": False}, "data.task_status"),
        ({"task_id": "1", "task_status": "x", "created_at": "yesterday"}, "data.created_at"),
        ({"task_id": "1", "task_status": "x", "created_at": True}, "data.created_at"),
        ({"task_id": "1", "task_status": "x", "task_info": []}, "data.task_info"),
        (
            {
                "task_id": "1",
                "task_status": "x",
                "task_result": {"videos": [{"id": "v", "duration": "long"}]},
            },
            "data.task_result.videos[0].duration",
        ),
        (
            {
                "task_id": "1",
                "task_status": "x",
                "task_result": {"videos": [{"id": "v", "duration": "false"}]},
            },
            "data.task_result.videos[0].duration",
        ),
        ([], "data"),
    ],
)
def test_wrong_shapes_name_the_field(data: Any, path: str) -> None:
    with pytest.raises(ResponseFormatError) as caught:
        parse_task(data)
    assert caught.value.path == path
    assert path in str(caught.value)


def test_list_errors_name_the_index() -> None:
    with pytest.raises(ResponseFormatError) as caught:
        parse_task_list([{"task_id": "1", "task_status": "x"}, {"task_id": 2}])
    assert caught.value.path is not None and caught.value.path.startswith("data[1]")


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
video_like = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=4) | json_values,
        "url": st.text(max_size=4) | json_values,
        "duration": st.sampled_from(["9.9", "5", "-1", "nan", "inf", "1e400", "x", ""])
        | st.floats()
        | st.integers()
        | json_values,
    },
)
task_like = st.fixed_dictionaries(
    {},
    optional={
        "task_id": json_values | st.text(max_size=5),
        "task_status": json_values | st.sampled_from(["submitted", "succeed", "failed"]),
        "task_status_msg": json_values,
        "task_info": json_values
        | st.fixed_dictionaries(
            {},
            optional={
                "parent_video": video_like | json_values,
                "external_task_id": json_values | st.text(max_size=3),
            },
        ),
        "task_result": json_values
        | st.fixed_dictionaries(
            {}, optional={"videos": st.lists(video_like | json_values, max_size=2) | json_values}
        ),
        "created_at": json_values | st.integers(min_value=-(10**16), max_value=10**16),
        "updated_at": json_values | st.floats(),
        "request_id": json_values,
    },
)


@given(json_values | task_like)
def test_arbitrary_json_parses_to_a_task_or_a_format_error(data: Any) -> None:
    try:
        task = parse_task(data)
    except ResponseFormatError:
        return
    assert isinstance(task, Task)


@given(
    st.integers(min_value=100, max_value=599),
    st.one_of(
        json_values,
        st.fixed_dictionaries(
            {
                "code": st.integers(min_value=-(2**63), max_value=2**63 - 1),
                "message": st.text(max_size=5),
                "data": json_values | task_like,
            }
        ),
    ),
)
def test_arbitrary_bodies_give_a_task_or_a_known_error(status: int, document: Any) -> None:
    # Written by the standard library, as any server might: numbers past 64 bits (which
    # orjson cannot write) and NaN or Infinity (not JSON at all) reach the client too.
    body = json.dumps(document).encode()
    try:
        data, request_id = _protocol.decode_envelope(status, {}, body)
        parse_task(data, request_id=request_id)
    except (ResponseFormatError, APIStatusError):
        pass


# -- round trips ---------------------------------------------------------------------------

videos = st.builds(
    Video,
    id=st.text(min_size=1, max_size=10),
    url=st.text(max_size=10),
    duration=st.floats(min_value=0, max_value=1e6, allow_nan=False),
)
tasks = st.builds(
    Task,
    task_id=st.text(min_size=1, max_size=10),
    status=st.sampled_from([TaskStatus.SUBMITTED, TaskStatus.SUCCEED]),
    status_message=st.text(max_size=10),
    created_at=st.none()
    | st.integers(min_value=0, max_value=4_000_000_000_000).map(
        lambda ms: datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    ),
    external_task_id=st.none() | st.text(min_size=1, max_size=5),
    parent_video=st.none() | videos,
    videos=st.lists(videos, max_size=2).map(tuple),
    request_id=st.none() | st.text(max_size=5),
).map(lambda t: __import__("attrs").evolve(t, raw_status=t.status.value))


@given(tasks)
def test_task_round_trips_through_the_wire_shape(task: Task) -> None:
    assert converter.structure(converter.unstructure(task), Task) == task


def test_task_pickles_inside_errors() -> None:
    from kling_async import TaskFailedError

    task = parse_task(sample("query-failed.json")["data"])
    error = pickle.loads(pickle.dumps(TaskFailedError(task)))
    assert error.task == task
    assert "risk control" in str(error)


# -- ExtendRequest validation -------------------------------------------------------------


def test_request_body() -> None:
    request = ExtendRequest(
        video_id="828006748715380777",
        prompt="延长动画效果",
        cfg_scale=0.5,
        watermark=True,
        parent_task_id="p1",
    )
    assert (
        request_body(request)
        == converter.unstructure(request)
        == {
            "video_id": "828006748715380777",
            "prompt": "延长动画效果",
            "cfg_scale": 0.5,
            "watermark_info": {"enabled": True},
            "task_id": "p1",
        }
    )


@given(st.text(max_size=2600))
def test_prompt_length_boundary(prompt: str) -> None:
    if not prompt.strip() and len(prompt) <= 2500:
        with pytest.raises(ValidationError, match="prompt: must have some non-space text"):
            ExtendRequest(video_id="v", prompt=prompt)
    elif len(prompt) <= 2500:
        assert ExtendRequest(video_id="v", prompt=prompt).prompt == prompt
        assert ExtendRequest(video_id="v", prompt="p", negative_prompt=prompt)
    else:
        with pytest.raises(ValidationError, match="prompt: must be at most 2500"):
            ExtendRequest(video_id="v", prompt=prompt)
        with pytest.raises(ValidationError, match="negative_prompt"):
            ExtendRequest(video_id="v", prompt="p", negative_prompt=prompt)


@pytest.mark.parametrize("length", [2499, 2500])
def test_prompt_at_the_limit(length: int) -> None:
    ExtendRequest(video_id="v", prompt="字" * length)


def test_prompt_one_past_the_limit() -> None:
    with pytest.raises(ValidationError) as caught:
        ExtendRequest(video_id="v", prompt="x" * 2501)
    assert caught.value.field == "prompt"
    assert caught.value.value_type == "str"
    assert "x" * 20 not in str(caught.value)  # the value itself is never echoed


@given(
    st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(min_value=-3, max_value=3),
        st.booleans(),
        st.text(max_size=3),
        st.none(),
    )
)
def test_cfg_scale_accepts_exactly_real_numbers_in_unit_interval(value: Any) -> None:
    valid = value is None or (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and not math.isnan(value)
        and 0 <= value <= 1
    )
    if valid:
        assert ExtendRequest(video_id="v", prompt="p", cfg_scale=value).cfg_scale == value
    else:
        with pytest.raises(ValidationError) as caught:
            ExtendRequest(video_id="v", prompt="p", cfg_scale=value)
        assert caught.value.field == "cfg_scale"
        assert "from 0 to 1" in caught.value.rule


@pytest.mark.parametrize("value", [0, 1, 0.0, 1.0, 0.5])
def test_cfg_scale_boundaries(value: float) -> None:
    assert ExtendRequest(video_id="v", prompt="p", cfg_scale=value).cfg_scale == value


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"video_id": "", "prompt": "p"}, "video_id"),
        ({"video_id": "a b", "prompt": "p"}, "video_id"),
        ({"video_id": 123, "prompt": "p"}, "video_id"),
        ({"video_id": "v", "prompt": None}, "prompt"),
        ({"video_id": "v", "prompt": "p", "cfg_scale": float("nan")}, "cfg_scale"),
        ({"video_id": "v", "prompt": "p", "cfg_scale": True}, "cfg_scale"),
        ({"video_id": "v", "prompt": "p", "cfg_scale": 1.0000001}, "cfg_scale"),
        ({"video_id": "v", "prompt": "p", "callback_url": "/relative"}, "callback_url"),
        ({"video_id": "v", "prompt": "p", "callback_url": "ftp://x.com/a"}, "callback_url"),
        ({"video_id": "v", "prompt": "p", "callback_url": "http://"}, "callback_url"),
        ({"video_id": "v", "prompt": "p", "callback_url": "http://[::1"}, "callback_url"),
        ({"video_id": "v", "prompt": "p", "watermark": "false"}, "watermark"),
        ({"video_id": "v", "prompt": "p", "watermark": 0}, "watermark"),
        ({"video_id": "v", "prompt": "p", "external_task_id": ""}, "external_task_id"),
        ({"video_id": "v", "prompt": "p", "parent_task_id": " "}, "parent_task_id"),
    ],
)
def test_bad_requests_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        ExtendRequest(**kwargs)
    assert caught.value.field == field
    assert isinstance(caught.value, ValueError)
    assert str(caught.value).startswith(f"{field}: ")


def test_good_callback_url() -> None:
    assert ExtendRequest(video_id="v", prompt="p", callback_url="https://h.example/cb?x=1")


def test_request_round_trips_through_the_converter() -> None:
    request = ExtendRequest(video_id="v", prompt="p", cfg_scale=1, watermark=False)
    assert converter.structure(converter.unstructure(request), ExtendRequest) == request


def test_poll_policy_checks() -> None:
    assert PollPolicy().initial == 2.0
    with pytest.raises(ValidationError, match="factor"):
        PollPolicy(factor=0.5)
    with pytest.raises(ValidationError, match="initial"):
        PollPolicy(initial=0)
    with pytest.raises(ValidationError, match="jitter"):
        PollPolicy(jitter=1.5)
    with pytest.raises(ValidationError, match="max_interval"):
        PollPolicy(max_interval=float("inf"))


def test_batch_result_ok() -> None:
    request = ExtendRequest(video_id="v", prompt="p")
    task = Task(task_id="1", status=TaskStatus.SUCCEED)
    assert BatchResult(index=0, request=request, task=task).ok
    assert not BatchResult(index=0, request=request).ok


requests = st.builds(
    ExtendRequest,
    video_id=st.text(min_size=1, max_size=8).filter(lambda v: not any(c.isspace() for c in v)),
    prompt=st.text(min_size=1, max_size=20).filter(str.strip),
    negative_prompt=st.none() | st.text(min_size=1, max_size=20),
    cfg_scale=st.none() | st.floats(min_value=0, max_value=1),
    callback_url=st.none() | st.just("https://example.com/cb"),
    external_task_id=st.none() | st.from_regex(r"[a-z0-9._-]{1,12}", fullmatch=True),
    watermark=st.none() | st.booleans(),
    parent_task_id=st.none() | st.from_regex(r"[0-9]{1,12}", fullmatch=True),
)


@given(requests)
def test_the_create_body_round_trips(request: ExtendRequest) -> None:
    body = converter.unstructure(request)
    assert all(value is not None for value in body.values())
    assert converter.structure(orjson.loads(orjson.dumps(body)), ExtendRequest) == request


def test_a_create_body_with_a_bad_field_names_it() -> None:
    with pytest.raises(ValidationError) as caught:
        converter.structure({"video_id": "v", "prompt": "p", "watermark_info": 1}, ExtendRequest)
    assert caught.value.field == "watermark_info"
    with pytest.raises(ValidationError) as caught:
        converter.structure({"video_id": "v", "prompt": "p", "watermark": True}, ExtendRequest)
    assert caught.value.field == "watermark"


def test_the_samples_parse_through_the_converter() -> None:
    for name in ("query-succeed.json", "query-failed.json", "create-official.json"):
        data = sample(name)["data"]
        assert converter.structure(data, Task) == parse_task(data)


# -- the defects of issue 7, items 4-6 ---------------------------------------------------------


def test_the_endpoint_pages_own_example_body_is_accepted() -> None:
    # The original endpoint page sends empty strings for the optional fields it leaves out.
    body = {
        "video_id": "828006748715380777",
        "prompt": "延长动画效果",
        "negative_prompt": "",
        "cfg_scale": 0.5,
        "callback_url": "",
    }
    request = converter.structure(body, ExtendRequest)
    assert request.negative_prompt is None
    assert request.callback_url is None
    assert "callback_url" not in converter.unstructure(request)
    assert ExtendRequest(video_id="v", prompt="p", callback_url="").callback_url is None


@pytest.mark.parametrize("prompt", ["", " ", "\t\n", "\u3000"])
def test_a_blank_prompt_is_refused(prompt: str) -> None:
    with pytest.raises(ValidationError) as caught:
        ExtendRequest(video_id="v", prompt=prompt)
    assert caught.value.field == "prompt"


@pytest.mark.parametrize("value", [10**400, -(10**400), 2, -1, float("inf"), float("nan")])
def test_cfg_scale_out_of_range_is_a_validation_error(value: float) -> None:
    with pytest.raises(ValidationError) as caught:
        ExtendRequest(video_id="v", prompt="p", cfg_scale=value)
    assert caught.value.field == "cfg_scale"


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com:99999/cb",
        "https://user:s3cret@example.com/cb",
        "https://user@example.com/cb",
        "https://example.com/cb#fragment",
        "https://example.com/cb#",
        "ftp://example.com/cb",
        "https:///cb",
    ],
)
def test_unusable_callback_urls_are_refused(url: str) -> None:
    with pytest.raises(ValidationError) as caught:
        ExtendRequest(video_id="v", prompt="p", callback_url=url)
    assert caught.value.field == "callback_url"
    assert "s3cret" not in str(caught.value)


def test_a_good_callback_url_is_kept() -> None:
    url = "https://example.com:8443/kling/callback?token=x"
    assert ExtendRequest(video_id="v", prompt="p", callback_url=url).callback_url == url


def test_validation_errors_say_the_length_the_value_or_the_path() -> None:
    with pytest.raises(ValidationError) as long_prompt:
        ExtendRequest(video_id="v", prompt="x" * 2501)
    assert str(long_prompt.value).endswith("(got a text of 2501 characters)")
    with pytest.raises(ValidationError) as scale:
        ExtendRequest(video_id="v", prompt="p", cfg_scale=2)
    assert str(scale.value).endswith("(got 2)")
    with pytest.raises(ValidationError) as url:
        ExtendRequest(video_id="v", prompt="p", callback_url="ftp://u:pw@x/")
    assert "'ftp://***@x/'" in str(url.value) and "pw" not in str(url.value)
    import pathlib

    from kling_async.errors import _shown

    assert _shown(pathlib.Path("nowhere/x.mp4")) == "'nowhere/x.mp4'"
    assert _shown(object()) == "object"
