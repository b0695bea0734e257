"""kling_async: an async-first client for Kling's video-extend API.

```python
from kling_async import KlingClient

async with KlingClient() as kling:
    task = await kling.extend_video("828006748715380777", "延长动画效果", cfg_scale=0.5)
    done = await kling.wait_for_task(task)
```
"""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from kling_async._batch import BatchProgress
from kling_async._client import KlingClient
from kling_async._models import BatchResult, ExtendRequest, PollPolicy, Task, TaskStatus, Video
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

try:
    __version__ = _version("kling-async")
except _PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BatchProgress",
    "BatchResult",
    "ConfigurationError",
    "ContentPolicyError",
    "ExtendRequest",
    "InsufficientBalanceError",
    "InvalidRequestError",
    "KlingClient",
    "KlingError",
    "NotFoundError",
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
