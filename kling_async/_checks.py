"""Runtime checks of arguments: annotations bind mypy, not the caller, so we look."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable, Sequence

_WHITESPACE = re.compile(r"\s")


def is_int_in(value: object, minimum: int, maximum: int | None = None) -> bool:
    """An int (not a bool) from `minimum` to `maximum` (inclusive)."""
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and minimum <= value
        and (maximum is None or value <= maximum)
    )


def is_seconds(value: object) -> bool:
    """A number of seconds, 0 or more (not a bool, not NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


def is_text(value: object) -> bool:
    """A string with something other than whitespace in it."""
    return isinstance(value, str) and bool(value.strip())


def is_collection_of_items(value: object) -> bool:
    """An iterable that is not a string or bytes (which iterate as characters)."""
    return isinstance(value, Iterable) and not isinstance(value, (str, bytes))


def is_nonempty_sequence(value: object) -> bool:
    """A non-empty list, tuple or other sequence that is not a string or bytes."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and len(value) > 0


def has_whitespace(value: str) -> bool:
    """Whether `value` has any whitespace character in it."""
    return _WHITESPACE.search(value) is not None


def is_http_url(value: object) -> bool:
    """An absolute http(s) URL with a host and no whitespace."""
    if not isinstance(value, str) or has_whitespace(value):
        return False
    try:
        parts = urllib.parse.urlsplit(value)
        host = parts.hostname
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(host)
