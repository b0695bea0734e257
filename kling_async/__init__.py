"""kling_async: an async-first client for Kling's video-extend API.

```python
from kling_async import KlingClient

async with KlingClient() as kling:
    task = await kling.extend_video("828006748715380777", "延长动画效果", cfg_scale=0.5)
    done = await kling.wait_for_task(task)
```
"""

from typing import Any as _Any

from kling_async._account import InMemoryAccount
from kling_async._client import KlingClient
from kling_async._models import (
    BatchProgress,
    BatchResult,
    ExtendRequest,
    PollPolicy,
    Task,
    TaskStatus,
    Video,
)
from kling_async._types import CallbackSource, OnDownloadProgress, OnProgress, OnUpdate
from kling_async.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    ConfigurationError,
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
    WaitTimeoutError,
)


def __getattr__(name: str) -> _Any:
    # importlib.metadata costs more to import than the rest of the package: only on demand.
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("kling-async")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        found = "0.0.0"
    globals()["__version__"] = found
    return found


__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BatchProgress",
    "BatchResult",
    "CallbackSource",
    "ConfigurationError",
    "ContentPolicyError",
    "ExtendRequest",
    "InMemoryAccount",
    "InsufficientBalanceError",
    "InvalidRequestError",
    "KlingClient",
    "KlingError",
    "NotFoundError",
    "OnDownloadProgress",
    "OnProgress",
    "OnUpdate",
    "PermissionDeniedError",
    "PollPolicy",
    "RateLimitError",
    "ResponseFormatError",
    "ServerError",
    "Task",
    "TaskFailedError",
    "TaskStatus",
    "ValidationError",
    "Video",
    "WaitTimeoutError",
    "__version__",
]
