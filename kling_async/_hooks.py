"""Calling the user's hooks (`on_update`, `on_progress`), which may be sync or async."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


async def call_back(callback: Callable[..., Any] | None, *args: Any) -> None:
    """Call `callback` with `args`, awaiting the result if it is awaitable."""
    if callback is None:
        return
    result = callback(*args)
    if inspect.isawaitable(result):
        await result
