"""The wire protocol's pure functions: envelopes, status mapping, retry rules, Retry-After."""

from __future__ import annotations

import contextlib
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kling_async import _protocol
from kling_async.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    ContentPolicyError,
    InsufficientBalanceError,
    InvalidRequestError,
    KlingError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ResponseFormatError,
    ServerError,
    ValidationError,
)

# Every service code of API.md: (HTTP status, code, exception, retried?)
SERVICE_CODES = [
    (401, 1000, AuthenticationError, False),
    (401, 1001, AuthenticationError, False),
    (401, 1002, AuthenticationError, False),
    (401, 1003, AuthenticationError, False),
    (401, 1004, AuthenticationError, False),
    (429, 1100, InsufficientBalanceError, False),
    (429, 1101, InsufficientBalanceError, False),
    (429, 1102, InsufficientBalanceError, False),
    (403, 1103, PermissionDeniedError, False),
    (400, 1200, InvalidRequestError, False),
    (400, 1201, InvalidRequestError, False),
    (404, 1202, NotFoundError, False),
    (404, 1203, NotFoundError, False),
    (400, 1300, ContentPolicyError, False),
    (400, 1301, ContentPolicyError, False),
    (429, 1302, RateLimitError, True),
    (429, 1303, RateLimitError, True),
    (429, 1304, PermissionDeniedError, False),
    (500, 5000, ServerError, True),
    (503, 5001, ServerError, True),
    (504, 5002, ServerError, True),
]


def envelope(code: int, message: str = "m", **extra: object) -> bytes:
    return orjson.dumps({"code": code, "message": message, "request_id": "rid-1", **extra})


@pytest.mark.parametrize(("status", "code", "cls", "retried"), SERVICE_CODES)
def test_every_service_code_maps_to_its_exception(
    status: int, code: int, cls: type[APIStatusError], retried: bool
) -> None:
    with pytest.raises(cls) as caught:
        _protocol.decode_envelope(status, {}, envelope(code, "why"))
    error = caught.value
    assert type(error) is cls
    assert (error.status, error.code, error.message, error.request_id) == (
        status,
        code,
        "why",
        "rid-1",
    )
    assert _protocol.is_retryable(error) is retried
    assert "rid-1" in str(error)


@pytest.mark.parametrize(
    ("status", "cls", "retried"),
    [
        (400, InvalidRequestError, False),
        (401, AuthenticationError, False),
        (403, PermissionDeniedError, False),
        (404, NotFoundError, False),
        (408, APIStatusError, True),
        (409, APIStatusError, False),
        (429, RateLimitError, False),  # API.md retries 429 only for 1302, 1303 or no code
        (500, ServerError, True),
        (502, ServerError, True),
        (599, ServerError, True),
    ],
)
def test_unknown_codes_map_by_status_class(
    status: int, cls: type[APIStatusError], retried: bool
) -> None:
    with pytest.raises(cls) as caught:
        _protocol.decode_envelope(status, {}, envelope(9999))
    assert type(caught.value) is cls
    assert _protocol.is_retryable(caught.value) is retried


def test_error_status_with_a_proxy_page_raises_by_status() -> None:
    with pytest.raises(ServerError) as caught:
        _protocol.decode_envelope(502, {}, b"<html>Bad gateway</html>")
    assert caught.value.code is None
    assert _protocol.is_retryable(caught.value)


@pytest.mark.parametrize(
    "body",
    [b"<html>", b'{"code": 0, "message": "SUC', b"[]", b'{"message": "x"}', b'{"code": "0"}', b""],
)
def test_a_2xx_that_is_not_the_envelope_is_a_retryable_format_error(body: bytes) -> None:
    with pytest.raises(ResponseFormatError) as caught:
        _protocol.decode_envelope(200, {}, body)
    assert caught.value.path is None
    assert _protocol.is_retryable(caught.value)
    assert _protocol.may_have_been_processed(caught.value)


def test_success_envelope() -> None:
    data, request_id = _protocol.decode_envelope(200, {}, envelope(0, data={"task_id": "1"}))
    assert data == {"task_id": "1"}
    assert request_id == "rid-1"


def test_a_field_error_inside_a_good_envelope_is_not_retried() -> None:
    error = ResponseFormatError("bad", path="data.task_id")
    assert not _protocol.is_retryable(error)
    assert not _protocol.may_have_been_processed(error)


def test_connection_errors_are_retried_and_may_have_been_processed() -> None:
    assert _protocol.is_retryable(APITimeoutError("t"))
    assert _protocol.may_have_been_processed(APITimeoutError("t"))
    refused = APIConnectionError("refused", sent=False)
    assert _protocol.is_retryable(refused)
    assert not _protocol.may_have_been_processed(refused)


def test_rate_limits_are_not_processed() -> None:
    error = _protocol.error_for(429, 1303, "busy")
    assert not _protocol.may_have_been_processed(error)
    assert _protocol.decide(error).action is _protocol.Action.WAIT_FOR_SLOT
    no_credit = _protocol.decide(_protocol.error_for(429, 1102, "empty"))
    assert no_credit.action is _protocol.Action.STOP_BATCH


Action = _protocol.Action


@pytest.mark.parametrize(
    ("status", "code", "retry_after", "action", "wait", "final"),
    [
        (500, 5000, None, Action.RETRY, None, False),
        (503, None, 3.0, Action.RETRY, 3.0, False),
        (408, None, None, Action.RETRY, None, False),
        (429, 1302, 0.01, Action.RETRY, 1.0, False),  # at least a second after a 429
        (429, 1302, 7.0, Action.RETRY, 7.0, False),
        (429, 1303, None, Action.WAIT_FOR_SLOT, 1.0, False),
        (429, None, None, Action.RETRY, 1.0, False),
        (429, 1999, None, Action.GIVE_UP, None, False),  # API.md: 1302, 1303 or no code
        (429, 1304, None, Action.GIVE_UP, None, False),
        (429, 1100, None, Action.STOP_BATCH, None, False),
        (429, 1102, None, Action.STOP_BATCH, None, False),
        (401, 1000, None, Action.STOP_BATCH, None, False),
        (401, None, None, Action.STOP_BATCH, None, False),
        (400, 1201, None, Action.GIVE_UP, None, True),
        (400, 1301, None, Action.GIVE_UP, None, True),
        (404, 1203, None, Action.GIVE_UP, None, False),
        (403, 1103, None, Action.GIVE_UP, None, False),
        (418, 1999, None, Action.GIVE_UP, None, False),
    ],
)
def test_one_function_decides_what_follows_an_error(
    status: int,
    code: int | None,
    retry_after: float | None,
    action: Action,
    wait: float | None,
    final: bool,
) -> None:
    error = _protocol.error_for(status, code, "m", retry_after=retry_after)
    assert _protocol.decide(error) == (action, wait, final)
    retried = action in (Action.RETRY, Action.WAIT_FOR_SLOT)
    assert _protocol.is_retryable(error) is retried


def test_errors_that_are_not_answers_are_decided_too() -> None:
    assert _protocol.decide(APITimeoutError("t")).action is Action.RETRY
    assert _protocol.decide(ResponseFormatError("garbled")).action is Action.RETRY
    assert _protocol.decide(ResponseFormatError("bad", path="data.x")).action is Action.GIVE_UP
    assert _protocol.decide(ValidationError("prompt", "is empty")).final
    assert _protocol.decide(KlingError("other")) == (Action.GIVE_UP, None, False)


def test_a_refused_create_waits_at_least_a_second_and_at_most_the_cap() -> None:
    assert _protocol.refused_wait(0.01, ours_running=True) == 1.0
    assert _protocol.refused_wait(9.0, ours_running=False) == 9.0
    assert 1.0 <= _protocol.refused_wait(None, ours_running=True) <= 5.0
    assert 1.0 <= _protocol.refused_wait(None, ours_running=False) <= _protocol.REFUSED_WAIT_CAP


def test_paths_quote_ids() -> None:
    assert _protocol.task_path("123") == "/v1/videos/video-extend/123"
    assert _protocol.task_path("../../x?y") == "/v1/videos/video-extend/..%2F..%2Fx%3Fy"
    assert _protocol.list_path(2, 50) == "/v1/videos/video-extend?pageNum=2&pageSize=50"


@pytest.mark.parametrize(
    ("key", "segment"),
    [
        (".", "%2E"),
        ("..", "%2E%2E"),
        ("...", "%2E%2E%2E"),
        ("a/b", "a%2Fb"),
        ("a?b#c", "a%3Fb%23c"),
        ("50%", "50%25"),
        ("a b", "a%20b"),
        ("é", "%C3%A9"),
        ("a.b", "a.b"),
    ],
)
def test_no_id_can_change_the_route(key: str, segment: str) -> None:
    assert _protocol.task_path(key) == f"/v1/videos/video-extend/{segment}"


def test_only_the_services_not_found_proves_a_task_absent() -> None:
    assert _protocol.is_task_absent(_protocol.error_for(404, 1203, "no such task"))
    # 1202: the server does not know the route; no code: a proxy's 404 page.
    assert not _protocol.is_task_absent(_protocol.error_for(404, 1202, "no such method"))
    with pytest.raises(NotFoundError) as caught:
        _protocol.decode_envelope(404, {}, b"<html>Not Found</html>")
    assert not _protocol.is_task_absent(caught.value)


def test_every_code_in_the_table_maps_to_its_class_and_retry_rule() -> None:
    for rule in _protocol.ERROR_CODES:
        error = _protocol.error_for(rule.status, rule.code, rule.meaning)
        assert type(error) is rule.error
        assert _protocol.is_retryable(error) is rule.retryable
    assert len({rule.code for rule in _protocol.ERROR_CODES}) == len(_protocol.ERROR_CODES)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("3", 3.0),
        ("0.25", 0.25),
        ("-4", 0.0),
        ("600", 60.0),
        ("soon", None),
        ("nan", None),
        ("", None),
    ],
)
def test_retry_after_seconds(header: str | None, expected: float | None) -> None:
    assert _protocol.parse_retry_after(header) == expected


def test_retry_after_http_date() -> None:
    now = datetime(2026, 11, 23, 12, 0, 0, tzinfo=timezone.utc)
    later = format_datetime(now + timedelta(seconds=7), usegmt=True)
    assert _protocol.parse_retry_after(later, now=now) == pytest.approx(7.0)
    much_later = format_datetime(now + timedelta(hours=1), usegmt=True)
    assert _protocol.parse_retry_after(much_later, now=now) == 60.0
    earlier = format_datetime(now - timedelta(seconds=30), usegmt=True)
    assert _protocol.parse_retry_after(earlier, now=now) == 0.0


def test_retry_after_reaches_the_error() -> None:
    with pytest.raises(RateLimitError) as caught:
        _protocol.decode_envelope(429, {"Retry-After": "2"}, envelope(1302))
    assert caught.value.retry_after == 2.0


@given(st.binary(max_size=200), st.integers(min_value=100, max_value=599))
def test_decode_never_raises_anything_else(body: bytes, status: int) -> None:
    with contextlib.suppress(APIStatusError, ResponseFormatError):
        _protocol.decode_envelope(status, {}, body)


def test_echoed_secrets_are_scrubbed_from_every_text_of_an_answer() -> None:
    body = orjson.dumps(
        {
            "code": 0,
            "message": "ok",
            "request_id": "r",
            "data": {"task_status_msg": "for sk-abcdefgh!", "list": ["sk-abcdefgh", 3]},
        }
    )
    data, _ = _protocol.decode_envelope(200, {}, body, (b"sk-abcdefgh",))
    assert data == {"task_status_msg": "for ***!", "list": ["***", 3]}
    with pytest.raises(AuthenticationError) as caught:
        _protocol.decode_envelope(401, {}, envelope(1002, "bad key sk-abcdefgh"), (b"sk-abcdefgh",))
    assert "sk-abcdefgh" not in str(caught.value)
