"""kling_async: an async-first client for Kling's video-extend API.

```python
from kling_async import KlingClient

async with KlingClient() as kling:
    task = await kling.extend_video("828006748715380777", "延长动画效果", cfg_scale=0.5)
    done = await kling.wait_for_task(task)
```
"""

# Not `typing.TYPE_CHECKING`: importing typing alone costs more than the rest of this
# file, and the command line starts here (mypy treats any `TYPE_CHECKING` as true).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from kling_async._account import InMemoryAccount
    from kling_async._client import KlingClient
    from kling_async._models import (
        BatchProgress,
        BatchResult,
        ExtendRequest,
        PollPolicy,
        ResourcePack,
        Task,
        TaskStatus,
        Video,
    )
    from kling_async._sync import SyncKlingClient
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
        InvalidSignatureError,
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

    __version__: str


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is not None:
        import importlib

        value = getattr(importlib.import_module(module), name)
    elif name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            value = version("kling-async")
        except PackageNotFoundError:  # pragma: no cover - running from a source tree
            value = "0.0.0"
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


del TYPE_CHECKING


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
    "InvalidSignatureError",
    "KlingClient",
    "KlingError",
    "NotFoundError",
    "OnDownloadProgress",
    "OnProgress",
    "OnUpdate",
    "PermissionDeniedError",
    "PollPolicy",
    "RateLimitError",
    "ResourcePack",
    "ResponseFormatError",
    "ServerError",
    "SyncKlingClient",
    "Task",
    "TaskFailedError",
    "TaskStatus",
    "ValidationError",
    "Video",
    "WaitTimeoutError",
    "__version__",
]

# Everything loads on first use, so that `import kling_async` (and so the command line's
# start, which a Ctrl-C may interrupt) does not pay for aiohttp, attrs and backoff.
_LAZY: dict[str, str] = {
    # Every exception class (their names all end in "Error"), from the exception tree.
    **dict.fromkeys((n for n in __all__ if n.endswith("Error")), "kling_async.errors"),
    "InMemoryAccount": "kling_async._account",
    "KlingClient": "kling_async._client",
    **dict.fromkeys(
        (
            "BatchProgress",
            "BatchResult",
            "ExtendRequest",
            "PollPolicy",
            "ResourcePack",
            "Task",
            "TaskStatus",
        ),
        "kling_async._models",
    ),
    "SyncKlingClient": "kling_async._sync",
    "Video": "kling_async._models",
    **dict.fromkeys(
        ("CallbackSource", "OnDownloadProgress", "OnProgress", "OnUpdate"), "kling_async._types"
    ),
}
