"""Client configuration: credentials and base URL from arguments or the environment, checked.

Also the argument checks the public signatures share (annotations bind mypy, not the
caller, so values are looked at before they are used).
"""

from __future__ import annotations

import ipaddress
import os
import urllib.parse
from typing import Final

from kling_async._auth import Auth, BearerAuth, JWTAuth
from kling_async.errors import ConfigurationError

DEFAULT_BASE_URL: Final = "https://api-singapore.klingai.com"
#: The environment variables the client reads when an argument is left out.
ENV_API_KEY: Final = "KLING_API_KEY"
ENV_ACCESS_KEY: Final = "KLING_ACCESS_KEY"
ENV_SECRET_KEY: Final = "KLING_SECRET_KEY"  # noqa: S105 - a variable name, not a secret
ENV_BASE_URL: Final = "KLING_BASE_URL"


def is_int_in(value: object, minimum: int, maximum: int | None = None) -> bool:
    """An int (not a bool) from `minimum` to `maximum` (inclusive)."""
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and minimum <= value
        and (maximum is None or value <= maximum)
    )


def is_seconds(value: object) -> bool:
    """A finite number of seconds, 0 or more (not a bool, not NaN)."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and 0 <= value < float("inf")
    )


def is_text(value: object) -> bool:
    """A string with something other than whitespace in it."""
    return isinstance(value, str) and bool(value.strip())


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def resolve_auth(api_key: str | None, access_key: str | None, secret_key: str | None) -> Auth:
    """The credentials: the arguments, else the environment; a bearer key wins."""
    if api_key is None and access_key is None and secret_key is None:
        api_key = _env(ENV_API_KEY)
        access_key = _env(ENV_ACCESS_KEY)
        secret_key = _env(ENV_SECRET_KEY)
    for name, value in (
        ("api_key", api_key),
        ("access_key", access_key),
        ("secret_key", secret_key),
    ):
        if value is not None and not is_text(value):
            raise ConfigurationError(f"{name} must be a non-empty string")
    if api_key is not None:
        return BearerAuth(api_key)
    if access_key is not None and secret_key is not None:
        return JWTAuth(access_key, secret_key)
    if access_key is not None:
        raise ConfigurationError(
            f"access_key and secret_key go together: secret_key ({ENV_SECRET_KEY}) is missing"
        )
    if secret_key is not None:
        raise ConfigurationError(
            f"access_key and secret_key go together: access_key ({ENV_ACCESS_KEY}) is missing"
        )
    raise ConfigurationError(
        f"no credentials: pass api_key= (a gateway's key) or access_key= and secret_key= "
        f"(official API), or set {ENV_API_KEY}, or {ENV_ACCESS_KEY} and {ENV_SECRET_KEY}"
    )


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine (plain http is then no risk to a key)."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_base_url(base_url: str | None, allow_insecure: bool) -> str:
    """The API root without a trailing slash: the argument, the environment, or the default."""
    url = base_url if base_url is not None else (_env(ENV_BASE_URL) or DEFAULT_BASE_URL)
    where = f"base_url ({ENV_BASE_URL})"
    if not isinstance(url, str):
        raise ConfigurationError(f"{where} must be a string")
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a port outside 0-65535
    except ValueError:
        raise ConfigurationError(f"{where} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ConfigurationError(f"{where} must be an absolute http(s) URL")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ConfigurationError(f"{where} must not carry credentials, a query or a fragment")
    if parts.scheme == "http" and not allow_insecure and not is_loopback(host):
        raise ConfigurationError(
            f"base_url uses plain http:// to {host}, which would send credentials in clear "
            "text; use https://, or pass allow_insecure=True (on the command line: "
            "--allow-insecure) if you really mean it"
        )
    return url.rstrip("/")


def check_count(name: str, value: object, minimum: int) -> int:
    """A client setting that is an integer of at least `minimum`."""
    if not is_int_in(value, minimum, None):
        raise ConfigurationError(f"{name} must be an integer of at least {minimum}")
    assert isinstance(value, int)
    return value
