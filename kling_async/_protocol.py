"""The wire protocol as pure functions: paths, envelopes, the service's codes, retry rules.

Nothing here does I/O or imports aiohttp, so every decision about what an answer means
(which exception, whether to retry it, whether a task is absent, how long to wait) is
made in this one module and can be tested without a socket. `ERROR_CODES` is the table
of the service's codes; the errors page of the documentation is generated from it.
"""

from __future__ import annotations

import enum
import functools
import math
import random
import urllib.parse
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, Final, NamedTuple

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
    TaskFailedError,
    ValidationError,
)

EXTEND_PATH: Final = "/v1/videos/video-extend"
#: The official API's account costs (resource packs); gateways usually lack it.
COSTS_PATH: Final = "/account/costs"
#: Kling answers at most one costs query a second per account.
COSTS_MIN_INTERVAL: Final = 1.0
#: The longest wait a ``Retry-After`` header can impose on us.
RETRY_AFTER_CAP: Final = 60.0
#: The shortest wait between two POSTs of one create after a 429 (1302, 1303): Kling
#: asks for at least a second, whatever a ``Retry-After`` says.
MIN_WAIT_AFTER_429: Final = 1.0
#: After a create failed in a way the service may still act on (a timeout, a dropped
#: connection, a 5xx: a gateway may deliver a queued request after we gave up on it), a
#: look-up's "no such task" proves the task absent only once this many seconds have
#: passed since the failure ended. See the Guarantees page.
ABSENCE_SETTLE: Final = 10.0

_settle = [ABSENCE_SETTLE]


def absence_settle() -> float:
    """Seconds after an ambiguous failure before "no such task" proves absence."""
    return _settle[0]


def set_absence_settle(seconds: float) -> float:
    """Change `absence_settle` (the test mode shortens it); returns the old value."""
    old, _settle[0] = _settle[0], seconds
    return old


class CodeRule(NamedTuple):
    """What one service code means: its HTTP status, our exception, and what to do."""

    code: int
    status: int
    error: type[APIStatusError]
    retryable: bool
    meaning: str
    action: str


#: Every service code API.md lists, in the order of Kling's own table.
ERROR_CODES: Final[tuple[CodeRule, ...]] = (
    CodeRule(1000, 401, AuthenticationError, False, "authentication failed", "check the key"),
    CodeRule(1001, 401, AuthenticationError, False, "Authorization header empty", "set a key"),
    CodeRule(1002, 401, AuthenticationError, False, "Authorization invalid", "check the key"),
    CodeRule(1003, 401, AuthenticationError, False, "token not yet valid", "check the clock (nbf)"),
    CodeRule(
        1004,
        401,
        AuthenticationError,
        False,
        "token expired",
        "none: the client re-signs a JWT once and sends again",
    ),
    CodeRule(1100, 429, InsufficientBalanceError, False, "account exception", "check the account"),
    CodeRule(1101, 429, InsufficientBalanceError, False, "account in arrears", "top up"),
    CodeRule(
        1102,
        429,
        InsufficientBalanceError,
        False,
        "resource pack used up or expired",
        "buy a pack; a batch stops submitting",
    ),
    CodeRule(1103, 403, PermissionDeniedError, False, "no access to this resource", "ask Kling"),
    CodeRule(1200, 400, InvalidRequestError, False, "invalid request", "fix the request"),
    CodeRule(1201, 400, InvalidRequestError, False, "invalid parameters", "fix the field named"),
    CodeRule(1202, 404, NotFoundError, False, "no such method or route", "check base_url's prefix"),
    CodeRule(1203, 404, NotFoundError, False, "no such task or video", "check the id"),
    CodeRule(1300, 400, ContentPolicyError, False, "content policy (input)", "change the prompt"),
    CodeRule(1301, 400, ContentPolicyError, False, "content policy (safety)", "change the input"),
    CodeRule(
        1302,
        429,
        RateLimitError,
        True,
        "requests too fast",
        "none: retried with backoff and Retry-After",
    ),
    CodeRule(
        1303,
        429,
        RateLimitError,
        True,
        "running tasks over the plan's limit",
        "none: waits for a running task to finish (see Sharing one account)",
    ),
    CodeRule(1304, 429, PermissionDeniedError, False, "IP not on the allow list", "allow this IP"),
    CodeRule(5000, 500, ServerError, True, "server error", "none: retried"),
    CodeRule(5001, 503, ServerError, True, "server unavailable", "none: retried"),
    CodeRule(5002, 504, ServerError, True, "server timeout", "none: retried"),
)

_RULES: Final[Mapping[int, CodeRule]] = {rule.code: rule for rule in ERROR_CODES}

#: No credit (1100-1102): never retried, and a batch stops submitting on them.
NO_CREDIT_CODES: Final = frozenset({1100, 1101, 1102})
#: The account runs as many tasks as its plan allows.
CONCURRENCY_LIMIT_CODE: Final = 1303
#: The JWT expired: re-sign once and send again.
TOKEN_EXPIRED_CODE: Final = 1004
#: The service's own "no such task": the only answer that proves a task absent.
TASK_NOT_FOUND_CODE: Final = 1203

#: An error answer with no service code is classified by its HTTP status.
_STATUS_TO_ERROR: Final[Mapping[int, type[APIStatusError]]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    422: InvalidRequestError,
    429: RateLimitError,
}
#: After a 1303 with nothing of ours running, wait at most this long before trying again.
REFUSED_WAIT_CAP: Final = 30.0


@functools.lru_cache(maxsize=4096)  # a wait polls the same task again and again
def task_path(task_or_external_id: str) -> str:
    """The path of one task, already percent-encoded.

    Every reserved character is quoted, and a segment of dots (``.``, ``..``) is encoded
    too: no HTTP stack may read it as "this directory" or "the parent", so no id can
    change the route. The transport sends the path as it is, without re-encoding.
    """
    segment = urllib.parse.quote(task_or_external_id, safe="")
    if not segment.strip("."):
        segment = "%2E" * len(segment)
    return f"{EXTEND_PATH}/{segment}"


def list_path(page: int, page_size: int) -> str:
    """The path and query of one page of the task list."""
    return f"{EXTEND_PATH}?pageNum={page}&pageSize={page_size}"


def costs_path(start_ms: int, end_ms: int, name: str | None = None) -> str:
    """The path and query of the resource packs bought between two Unix-ms times."""
    query = {"start_time": str(start_ms), "end_time": str(end_ms)}
    if name is not None:
        query["resource_pack_name"] = name
    return f"{COSTS_PATH}?{urllib.parse.urlencode(query)}"


def costs_not_offered(error: BaseException, base_url: str) -> NotFoundError | None:
    """The error to raise when a costs query found no such endpoint, else None.

    Any 404 to ``/account/costs`` (1202, a proxy's page, a gateway's own "not found")
    means the base URL does not serve it: resource packs are an official-API call.
    """
    if not isinstance(error, NotFoundError):
        return None
    return NotFoundError(
        f"{base_url} does not offer {COSTS_PATH} (resource packs are a call of Kling's "
        "official API; most gateways do not forward it)",
        status=error.status,
        code=error.code,
        request_id=error.request_id,
    )


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
        import email.utils  # HTTP dates are rare: not worth importing up front

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
    rule = _RULES.get(code) if code is not None else None
    if rule is not None:
        cls = rule.error
    else:
        cls = _STATUS_TO_ERROR.get(status) or (ServerError if status >= 500 else APIStatusError)
    return cls(message, status=status, code=code, request_id=request_id, retry_after=retry_after)


#: What a credential found in an answer is replaced with.
SCRUBBED: Final = "***"


def scrub(value: Any, secrets: tuple[str, ...]) -> Any:
    """`value` (decoded JSON) with every secret replaced by `SCRUBBED` in every string."""
    if type(value) is str:
        for secret in secrets:
            value = value.replace(secret, SCRUBBED)
        return value
    if type(value) is dict:
        return {scrub(k, secrets): scrub(v, secrets) for k, v in value.items()}
    if type(value) is list:
        return [scrub(item, secrets) for item in value]
    return value


def decode_envelope(
    status: int, headers: Mapping[str, str], body: bytes, secrets: tuple[bytes, ...] = ()
) -> tuple[Any, str | None]:
    """One HTTP answer as ``(data, request_id)``, or the matching `KlingError` raised.

    An error status with a body that is not the envelope (a proxy's HTML page) still
    raises by status class; a 2xx that is not the envelope raises `ResponseFormatError`.
    `secrets` (the client's own credentials) are scrubbed from every text of the answer
    before anything reads it: a server that echoes a key or a token (``invalid
    Authorization: Bearer sk-...``) cannot put it into an error, a log line, a task, a
    journal or the command line's output. The bytes are searched first, so an answer
    without a secret costs one scan.
    """
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        document = None
    # Every JWT starts with "eyJ" (base64 of '{"'): an answer without it holds none of
    # the many tokens a client signed, and is searched for the key and secret only.
    tokens = _TOKEN_START in body
    found = tuple(
        secret.decode()
        for secret in secrets
        if (tokens or not secret.startswith(_TOKEN_START)) and secret in body
    )
    if found:
        document = scrub(document, found)
    if type(document) is dict:
        code = document.get("code")
        message = document.get("message", "")
        raw_request_id = document.get("request_id")
        request_id = raw_request_id if type(raw_request_id) is str else None
        if code == 0 and type(code) is int and status < 400:
            return document.get("data"), request_id
        if type(code) is int and (message is None or type(message) is str):
            raise error_for(
                status, code, message or _status_text(status), request_id, _retry_after(headers)
            )
    if status >= 400:
        raise error_for(status, None, _status_text(status), None, _retry_after(headers))
    raise ResponseFormatError("the answer is not the service's JSON envelope", status=status)


_TOKEN_START: Final = b"eyJ"


def _retry_after(headers: Mapping[str, str]) -> float | None:
    return parse_retry_after(headers.get("Retry-After"))


def _status_text(status: int) -> str:
    return f"HTTP status {status}"


class Action(enum.Enum):
    """What to do after an error: the answer of `decide`."""

    #: Try again, after `Decision.wait` at least (None: the caller's own backoff).
    RETRY = "retry"
    #: The account runs as many tasks as its plan allows (1303): with an account, wait for
    #: one of its slots to come free; without one, a retry like any other.
    WAIT_FOR_SLOT = "wait for a slot"
    #: Nothing more can be created (no credit, credentials refused): a batch submits no
    #: more items, and this one fails.
    STOP_BATCH = "stop the batch"
    #: This call fails; asking again will not help.
    GIVE_UP = "give up"


class Decision(NamedTuple):
    """`decide`'s answer for one error."""

    action: Action
    #: The shortest wait before trying again, in seconds, when the service set one (its
    #: ``Retry-After``, and at least `MIN_WAIT_AFTER_429` after a 429); None: ours.
    wait: float | None = None
    #: Whether a batch run again keeps this outcome (a request the service refused as
    #: such, a task that failed) instead of trying the item again.
    final: bool = False


_GIVE_UP: Final = Decision(Action.GIVE_UP)
_RETRY: Final = Decision(Action.RETRY)


def decide(error: BaseException) -> Decision:
    """What to do after `error`: the one answer to "try again?" (API.md, Retries).

    Retried: connection failures and timeouts, 408, 5xx, 429 with 1302, 1303 or no code
    (another 429 code is not one API.md retries), and answers that are not the envelope.
    Stopping a batch: 1100-1102 (no credit) and refused credentials. Given up: everything
    else. Kept by a batch run again: a request refused as such (400: bad parameters,
    content policy), a validation error and a failed task.
    """
    if isinstance(error, APIConnectionError):
        return _RETRY
    if isinstance(error, ResponseFormatError):
        # Not the envelope at all (cut-off JSON, HTML): a transient proxy fault. A field of
        # the wrong shape inside a good envelope will not get better by asking again.
        return _RETRY if error.path is None else _GIVE_UP
    if isinstance(error, APIStatusError):
        return _decide_status(error)
    if isinstance(error, (TaskFailedError, ValidationError)):
        return Decision(Action.GIVE_UP, final=True)
    return _GIVE_UP


def _decide_status(error: APIStatusError) -> Decision:
    rule = _RULES.get(error.code) if error.code is not None else None
    if error.code in NO_CREDIT_CODES or (
        isinstance(error, AuthenticationError) and error.code != TOKEN_EXPIRED_CODE
    ):
        return Decision(Action.STOP_BATCH)
    if error.status == 429 and (rule.retryable if rule is not None else error.code is None):
        # Kling asks for at least a second between tries, whatever Retry-After says.
        wait = max(MIN_WAIT_AFTER_429, error.retry_after or 0.0)
        if error.code == CONCURRENCY_LIMIT_CODE:
            return Decision(Action.WAIT_FOR_SLOT, wait)
        return Decision(Action.RETRY, wait)
    # A code we do not know, or none: the HTTP status class speaks.
    retryable = (
        rule.retryable if rule is not None else error.status in (408,) or error.status >= 500
    )
    if retryable:
        return Decision(Action.RETRY, error.retry_after)
    return Decision(
        Action.GIVE_UP, final=isinstance(error, (InvalidRequestError, ContentPolicyError))
    )


def is_retryable(error: BaseException) -> bool:
    """Whether a failed attempt may be tried again (whatever the account): `decide`."""
    return decide(error).action in (Action.RETRY, Action.WAIT_FOR_SLOT)


def refused_wait(retry_after: float | None, *, ours_running: bool) -> float:
    """How long a create refused with 1303 waits at most for a slot to free (both
    accounts): the service's wait when it gave one (at least a second); otherwise a
    jittered backoff, short while tasks of ours run (one ending frees a slot sooner),
    long when the tasks filling the account are someone else's."""
    if retry_after is not None:
        return max(MIN_WAIT_AFTER_429, retry_after)
    return random.uniform(1.0, 5.0 if ours_running else REFUSED_WAIT_CAP)


def may_have_been_processed(error: BaseException) -> bool:
    """Whether the service may have acted on a request that failed this way.

    True for timeouts, dropped connections, 5xx and answers that are not the envelope:
    after these, a create must look its task up before it submits again.
    """
    if isinstance(error, APIConnectionError):
        return error.sent
    if isinstance(error, ResponseFormatError):
        return error.path is None
    if isinstance(error, APIStatusError):
        return error.status >= 500 or isinstance(error, ServerError)
    return False


def is_task_absent(error: BaseException) -> bool:
    """Whether an error proves that the task looked up does not exist.

    Only the service's own answer does (404 with code 1203). A 404 without the envelope
    (a proxy's page), or with another code (1202: a route the server does not know),
    says nothing about the task, so it must never be a reason to create one again.
    """
    return isinstance(error, NotFoundError) and error.code == TASK_NOT_FOUND_CODE


def is_duplicate_refusal(error: BaseException) -> bool:
    """Whether a create was refused because its ``external_task_id`` already names a task.

    Kling's newer API answers 400 with code 1201 and a message saying the id exists;
    gateways word it differently or answer 409. The task exists: look it up, never fail.
    """
    if not isinstance(error, APIStatusError) or error.status not in (400, 409):
        return False
    text = error.message.lower()
    return error.status == 409 or (
        "external" in text and any(word in text for word in ("exist", "duplicat", "already"))
    )


def is_token_expired(error: KlingError) -> bool:
    """A 1004: the signed token expired (re-signing may help)."""
    return isinstance(error, AuthenticationError) and error.code == TOKEN_EXPIRED_CODE
