"""The wire protocol as pure functions: paths, request bodies, envelopes, errors, retry rules.

Nothing here does I/O or imports aiohttp, so every decision about what an answer means
(which exception, whether to retry, how long to wait) can be tested without a socket.
"""

from __future__ import annotations

import email.utils
import math
import urllib.parse
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, Final

import attrs
import orjson

from kling_async.errors import (
    APIConnectionError,
    APIStatusError,
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
)

EXTEND_PATH: Final = "/v1/videos/video-extend"
#: The longest wait a ``Retry-After`` header can impose on us.
RETRY_AFTER_CAP: Final = 60.0
#: Codes that mean "no credit": never retried, and a batch stops submitting on them.
NO_CREDIT_CODES: Final = frozenset({1100, 1101, 1102})
#: 429 codes that mean "later": too many requests, or too many running tasks.
RATE_LIMIT_CODES: Final = frozenset({1302, 1303})
CONCURRENCY_LIMIT_CODE: Final = 1303
TOKEN_EXPIRED_CODE: Final = 1004

_CODE_TO_ERROR: Final[Mapping[int, type[APIStatusError]]] = {
    **dict.fromkeys(range(1000, 1005), AuthenticationError),
    **dict.fromkeys(NO_CREDIT_CODES, InsufficientBalanceError),
    1103: PermissionDeniedError,
    1200: InvalidRequestError,
    1201: InvalidRequestError,
    1202: NotFoundError,
    1203: NotFoundError,
    1300: ContentPolicyError,
    1301: ContentPolicyError,
    1302: RateLimitError,
    1303: RateLimitError,
    1304: PermissionDeniedError,
    5000: ServerError,
    5001: ServerError,
    5002: ServerError,
}

_STATUS_TO_ERROR: Final[Mapping[int, type[APIStatusError]]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    422: InvalidRequestError,
    429: RateLimitError,
}


def task_path(task_or_external_id: str) -> str:
    """The path of one task; the id is quoted so it can never leave the endpoint."""
    return f"{EXTEND_PATH}/{urllib.parse.quote(task_or_external_id, safe='')}"


def list_query(page: int, page_size: int) -> dict[str, str]:
    """The query string of one page of the task list."""
    return {"pageNum": str(page), "pageSize": str(page_size)}


def create_body(
    *,
    video_id: str,
    prompt: str,
    negative_prompt: str | None = None,
    cfg_scale: float | None = None,
    callback_url: str | None = None,
    external_task_id: str | None = None,
    watermark: bool | None = None,
    parent_task_id: str | None = None,
) -> dict[str, Any]:
    """The JSON body of a create request; fields that are None are left out."""
    body: dict[str, Any] = {"video_id": video_id, "prompt": prompt}
    if negative_prompt is not None:
        body["negative_prompt"] = negative_prompt
    if cfg_scale is not None:
        body["cfg_scale"] = cfg_scale
    if callback_url is not None:
        body["callback_url"] = callback_url
    if external_task_id is not None:
        body["external_task_id"] = external_task_id
    if watermark is not None:
        body["watermark_info"] = {"enabled": watermark}
    if parent_task_id is not None:
        body["task_id"] = parent_task_id
    return body


@attrs.frozen
class Envelope:
    """A decoded success answer: ``code`` 0 and its ``data``."""

    data: Any
    request_id: str | None
    message: str = ""


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or HTTP-date), capped at 60.

    Returns None when the header is absent or unreadable; a date in the past gives 0.
    """
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - (now or datetime.now(timezone.utc))).total_seconds()
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_CAP)


def error_for(
    status: int,
    code: int | None,
    message: str,
    request_id: str | None = None,
    retry_after: float | None = None,
) -> APIStatusError:
    """The exception for an error answer: by service code, else by HTTP status class."""
    cls = _CODE_TO_ERROR.get(code) if code is not None else None
    if cls is None:
        cls = _STATUS_TO_ERROR.get(status)
    if cls is None:
        cls = ServerError if status >= 500 else APIStatusError
    return cls(message, status=status, code=code, request_id=request_id, retry_after=retry_after)


def decode_envelope(status: int, headers: Mapping[str, str], body: bytes) -> Envelope:
    """Turn one HTTP answer into its `Envelope`, or raise the matching `KlingError`.

    An error status with a body that is not the envelope (a proxy's HTML page) still
    raises by status class; a 2xx that is not the envelope raises `ResponseFormatError`.
    """
    # Retry-After only matters on an error answer.
    retry_after = parse_retry_after(headers.get("Retry-After")) if status >= 400 else None
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        document = None
    envelope_ok = (
        isinstance(document, dict)
        and type(document.get("code")) is int
        and isinstance(document.get("message", ""), str)
    )
    if not envelope_ok:
        if status >= 400:
            raise error_for(status, None, _status_text(status), None, retry_after)
        raise ResponseFormatError("the answer is not the service's JSON envelope", status=status)
    assert isinstance(document, dict)  # for mypy: checked by envelope_ok
    code: int = document["code"]
    message: str = document.get("message") or ""
    raw_request_id = document.get("request_id")
    request_id = raw_request_id if isinstance(raw_request_id, str) else None
    if code != 0 or status >= 400:
        raise error_for(status, code, message or _status_text(status), request_id, retry_after)
    return Envelope(data=document.get("data"), request_id=request_id, message=message)


def _status_text(status: int) -> str:
    return f"HTTP status {status}"


def is_retryable(error: BaseException) -> bool:
    """Whether a failed attempt may be tried again (API.md, Retries)."""
    if isinstance(error, APIConnectionError):
        return True
    if isinstance(error, ResponseFormatError):
        # Not the envelope at all (cut-off JSON, HTML): a transient proxy fault. A field of
        # the wrong shape inside a good envelope will not get better by asking again.
        return error.path is None
    if isinstance(error, APIStatusError):
        if error.code in NO_CREDIT_CODES or error.code == 1304:
            return False
        if error.status == 429:
            return error.code is None or error.code in RATE_LIMIT_CODES
        return error.status == 408 or error.status >= 500 or error.code in (5000, 5001, 5002)
    return False


def may_have_been_processed(error: KlingError) -> bool:
    """Whether the service may have acted on a request that failed this way.

    True for timeouts, dropped connections, 5xx and answers that are not the envelope:
    after these, a create must look its task up before it submits again.
    """
    if isinstance(error, APIConnectionError):
        return error.sent
    if isinstance(error, ResponseFormatError):
        return error.path is None
    if isinstance(error, APIStatusError):
        return error.status >= 500 or error.code in (5000, 5001, 5002)
    return False


def is_concurrency_limit(error: BaseException) -> bool:
    """A 1303: the account has as many running tasks as its plan allows."""
    return isinstance(error, RateLimitError) and error.code == CONCURRENCY_LIMIT_CODE


def is_no_credit(error: BaseException) -> bool:
    """A 1100-1102: the account cannot pay for another task."""
    return isinstance(error, InsufficientBalanceError) and error.code in NO_CREDIT_CODES
