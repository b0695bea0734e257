"""Wire-format helpers: the JSON envelope, the service's code table and bearer/JWT checks."""

from __future__ import annotations

import binascii
import hashlib
import hmac
import uuid
from typing import Any

import jwt
import orjson
from aiohttp import web

_MISSING = object()

MESSAGES: dict[int, str] = {
    0: "SUCCEED",
    1001: "Authorization is empty",
    1002: "Authorization is invalid",
    1003: "Authorization is not yet valid",
    1004: "Authorization has expired",
    1102: "Account exception: resource pack depleted or expired",
    1200: "Invalid request parameters",
    1201: "Invalid request parameters",
    1202: "The requested method is invalid",
    1203: "The requested resource does not exist",
    1302: "The API request is too fast, please slow down the request frequency",
    1303: "parallel task over resource pack limit",
    5000: "Server internal error",
    5001: "Server temporarily unavailable, usually due to maintenance",
    5002: "Server internal timeout, usually due to a backlog",
}

HTTP_STATUS: dict[int, int] = {
    1001: 401,
    1002: 401,
    1003: 401,
    1004: 401,
    1102: 429,
    1200: 400,
    1201: 400,
    1202: 404,
    1203: 404,
    1302: 429,
    1303: 429,
    5000: 500,
    5001: 503,
    5002: 504,
}


def envelope_bytes(code: int, message: str | None = None, data: Any = _MISSING) -> bytes:
    """Serialize `{"code", "message", "request_id", "data"}` (errors carry `data: null`).

    Code 1303 leaves the `data` key out, like the real service.
    """
    body: dict[str, Any] = {
        "code": code,
        "message": MESSAGES.get(code, "") if message is None else message,
        "request_id": str(uuid.uuid4()),
    }
    if data is not _MISSING:
        body["data"] = data
    elif code != 1303:
        body["data"] = None
    return orjson.dumps(body)


def envelope(
    code: int,
    message: str | None = None,
    data: Any = _MISSING,
    *,
    status: int | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An `application/json` envelope response; the HTTP status follows the code."""
    if status is None:
        status = HTTP_STATUS.get(code, 200)
    return web.Response(
        body=envelope_bytes(code, message, data),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def decode_hs256(token: str, secret: str) -> dict[str, Any] | None:
    """Verify an HS256 JWT's signature with `secret` and return its claims, else `None`.

    The HMAC is checked here (constant-time) rather than by `jwt.decode`, because PyJWT
    warns about secrets shorter than 32 bytes, which Kling issues, and silencing that
    with `warnings.catch_warnings()` is not thread-safe. Claims are parsed by PyJWT.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        header = jwt.get_unverified_header(token)
        signature = jwt.utils.base64url_decode(parts[2])
    except (jwt.InvalidTokenError, binascii.Error, ValueError):
        return None
    if header.get("alg") != "HS256":
        return None
    signing_input = f"{parts[0]}.{parts[1]}".encode()
    expected = hmac.new(secret.encode(), signing_input, hashlib.sha256).digest()
    if not hmac.compare_digest(expected, signature):
        return None
    try:
        claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return None
    return claims


def is_number(value: object) -> bool:
    """A JSON number (int or float, not bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def int_param(value: str) -> int | None:
    """A query parameter as a non-negative int, `None` if it is not one."""
    value = value.strip()
    return int(value) if value.isascii() and value.isdigit() else None
