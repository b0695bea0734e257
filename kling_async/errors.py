"""Every exception kling_async raises, in one tree.

```
KlingError
├── ConfigurationError          bad client settings (missing credentials, http:// to a remote host)
├── ValidationError             bad input to a request (also a ValueError)
├── APIConnectionError          the request may not have been answered
│   └── APITimeoutError         ... because it timed out
├── ResponseFormatError         not the service's envelope, or a field of the wrong shape
├── APIStatusError              an error answer (.status, .code, .message, .request_id)
│   ├── AuthenticationError     401, codes 1000-1004
│   ├── PermissionDeniedError   403, code 1103; 429, code 1304 (IP not on the allow list)
│   ├── InsufficientBalanceError 429, codes 1100-1102 (never retried)
│   ├── InvalidRequestError     400, codes 1200, 1201
│   ├── NotFoundError           404, codes 1202, 1203
│   ├── ContentPolicyError      400, codes 1300, 1301
│   ├── RateLimitError          429, codes 1302, 1303
│   └── ServerError             5xx, codes 5000-5002
├── TaskFailedError             a task ended "failed" (.task)
├── WaitTimeoutError            a wait ran out of time (.task, the last state seen)
└── InvalidSignatureError       a callback's signature is missing or wrong (answered 401)
```

No exception carries a credential: messages are built from the service's answer and the
request's method and path only, never from headers.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kling_async._models import Task

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "ConfigurationError",
    "ContentPolicyError",
    "InsufficientBalanceError",
    "InvalidRequestError",
    "KlingError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "ResponseFormatError",
    "ServerError",
    "TaskFailedError",
    "ValidationError",
    "WaitTimeoutError",
]


_NO_VALUE: Any = object()
#: Longest text shown as it is in a `ValidationError`; a longer one is shown by length.
_SHOWN_TEXT = 40
#: ``user:password@`` in a URL: never shown.
_USERINFO = re.compile(r"(?<=//)[^/@\s]*@")


def _shown(value: object) -> str:
    """A given value as an error shows it: numbers and short texts as they are, a long
    text by its length (a prompt is no one else's business), a path as the path, any
    other object by its type; a URL's ``user:password@`` never."""
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, str):
        if len(value) > _SHOWN_TEXT:
            return f"a text of {len(value)} characters"
        return repr(_USERINFO.sub("***@", value))
    if isinstance(value, os.PathLike):
        path = os.fspath(value)
        return repr(path) if isinstance(path, str) else type(value).__name__
    return type(value).__name__


class KlingError(Exception):
    """Base class of every error raised by kling_async."""

    def parts(self) -> tuple[str, dict[str, Any]]:
        """The message and the keyword arguments that rebuild this error with `rebuild`.

        The one description of an error's context: pickling (`__reduce__`), the batch
        journal and the command line's JSON all use it. Values are plain data, but for
        `TaskFailedError` and `WaitTimeoutError`, whose ``task`` (and ``steps``) are
        `Task` objects. Never a credential.
        """
        return str(self), {}

    @classmethod
    def rebuild(cls, message: str, parts: dict[str, Any]) -> KlingError:
        """The error `parts` describes (see there)."""
        return cls(message, **parts)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), *self.parts()))


def _rebuild(cls: type[KlingError], message: str, parts: dict[str, Any]) -> KlingError:
    return cls.rebuild(message, parts)


class ConfigurationError(KlingError):
    """The client was configured in a way that cannot work (raised at construction)."""


class ValidationError(KlingError, ValueError):
    """A request argument broke a rule; `field` names it, `rule` says what was expected."""

    def __init__(self, field: str, rule: str, value: object = _NO_VALUE) -> None:
        self.field = field
        self.rule = rule
        #: The kind of value that was given (its type's name).
        self.value_type = None if value is _NO_VALUE else type(value).__name__
        got = "" if value is _NO_VALUE else f" (got {_shown(value)})"
        super().__init__(f"{field}: {rule}{got}")

    def parts(self) -> tuple[str, dict[str, Any]]:
        # The text as it was, "(got ...)" included: the value itself is never kept.
        return str(self), {"field": self.field, "rule": self.rule, "value_type": self.value_type}

    @classmethod
    def rebuild(cls, message: str, parts: dict[str, Any]) -> KlingError:
        error = cls(parts["field"], parts["rule"])
        error.value_type = parts.get("value_type")
        error.args = (message,)
        return error


class APIConnectionError(KlingError):
    """The request failed before an answer arrived (refused, reset, dropped).

    `sent` is False only when the connection was never made, so the service cannot have
    seen the request; otherwise it may have been processed.
    """

    def __init__(
        self, message: str, *, method: str = "", path: str = "", sent: bool = True
    ) -> None:
        self.method = method
        self.path = path
        self.sent = sent
        self._message = message
        super().__init__(f"{method} {path}: {message}" if method else message)

    def parts(self) -> tuple[str, dict[str, Any]]:
        return self._message, {"method": self.method, "path": self.path, "sent": self.sent}


class APITimeoutError(APIConnectionError):
    """The request timed out; it may still have reached the service."""


class ResponseFormatError(KlingError):
    """The answer was not the service's JSON envelope, or a field had the wrong shape.

    `path` names the offending field (for example ``data.task_result.videos[0].duration``)
    when the envelope itself was fine; `status` is the HTTP status.
    """

    def __init__(self, message: str, *, path: str | None = None, status: int | None = None) -> None:
        self.path = path
        self.status = status
        self._message = message
        where = f" at {path}" if path else ""
        super().__init__(f"{message}{where}")

    def parts(self) -> tuple[str, dict[str, Any]]:
        return self._message, {"path": self.path, "status": self.status}


class APIStatusError(KlingError):
    """The service answered with an error envelope or an error HTTP status."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        code: int | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id
        #: Seconds the service asked us to wait (``Retry-After``), already capped.
        self.retry_after = retry_after
        parts = [f"HTTP {status}"]
        if code is not None:
            parts.append(f"code {code}")
        text = f"{', '.join(parts)}: {message}"
        if request_id:
            text += f" (request_id={request_id})"
        super().__init__(text)

    def parts(self) -> tuple[str, dict[str, Any]]:
        return self.message, {
            "status": self.status,
            "code": self.code,
            "request_id": self.request_id,
            "retry_after": self.retry_after,
        }


class AuthenticationError(APIStatusError):
    """401: the key or token was missing, invalid, not yet valid or expired (1000-1004)."""


class PermissionDeniedError(APIStatusError):
    """403: the account may not use this resource (1103); 429 1304: IP not allowed."""


class InsufficientBalanceError(APIStatusError):
    """429: the account has no credit (1100 account, 1101 arrears, 1102 pack used up)."""


class InvalidRequestError(APIStatusError):
    """400: the service rejected the parameters (1200, 1201)."""


class NotFoundError(APIStatusError):
    """404: no such task or video (1202, 1203)."""


class ContentPolicyError(APIStatusError):
    """400: the input broke the content policy (1300, 1301)."""


class RateLimitError(APIStatusError):
    """429: too many requests (1302) or too many running tasks (1303), both retried (at
    least a second apart), as is a 429 without a code; another 429 code is not."""


class ServerError(APIStatusError):
    """5xx: the service failed (5000, 5001, 5002). Retried."""


class TaskFailedError(KlingError):
    """The task ended with status ``failed``; `task` is its final state."""

    def __init__(self, task: Task, steps: tuple[Task, ...] = ()) -> None:
        self.task = task
        #: For `extend_chain`: the steps that finished before this one failed.
        self.steps = steps
        reason = task.status_message or "no reason given"
        super().__init__(f"task {task.task_id} failed: {reason}")

    def parts(self) -> tuple[str, dict[str, Any]]:
        return str(self), {"task": self.task, "steps": self.steps}

    @classmethod
    def rebuild(cls, message: str, parts: dict[str, Any]) -> KlingError:
        return cls(parts["task"], tuple(parts.get("steps", ())))


class WaitTimeoutError(KlingError):
    """A wait ran out of time; `task` is the last state seen (the task goes on running)."""

    def __init__(self, task: Task, timeout: float) -> None:
        self.task = task
        self.timeout = timeout
        super().__init__(f"task {task.task_id} still {task.raw_status} after {timeout:g} s")

    def parts(self) -> tuple[str, dict[str, Any]]:
        return str(self), {"task": self.task, "timeout": self.timeout}

    @classmethod
    def rebuild(cls, message: str, parts: dict[str, Any]) -> KlingError:
        return cls(parts["task"], parts["timeout"])


class InvalidSignatureError(KlingError):
    """A callback's signature headers are missing, stale, garbled or do not match (→ 401).

    The message never shows the secret, the signatures or the body.
    """
