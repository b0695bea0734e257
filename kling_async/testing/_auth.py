"""Checking the `Authorization` header: a bearer API key or an HS256 JWT."""

from __future__ import annotations

import hmac
import math
import time
from collections.abc import Callable
from typing import Any

from ._wire import decode_hs256, is_number

__all__ = ["Authenticator"]

_CACHE_SIZE = 4096


class Authenticator:
    """Accepts the API key as-is, or an HS256 JWT with `iss` = access key.

    Anything else gets a Kling auth code (1001 to 1004).
    """

    def __init__(
        self,
        *,
        api_key: str | None,
        access_key: str | None,
        secret_key: str | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self.api_key = api_key
        self.access_key = access_key
        self.secret_key = secret_key
        self._claims: dict[str, dict[str, Any]] = {}
        self._revoked: set[str] = set()
        self._expired_at: float | None = None

    def expire_tokens(self) -> None:
        """Reject every JWT signed before now (and every one seen so far) with 1004."""
        self._expired_at = self._clock()
        self._revoked.update(self._claims)

    def check(self, header: str | None) -> int:
        """0 when `header` (the `Authorization` value) is accepted, else the error code."""
        header = (header or "").strip()
        if not header:
            return 1001
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return 1002
        if self.api_key is not None and hmac.compare_digest(token.encode(), self.api_key.encode()):
            return 0
        if self.access_key is None or self.secret_key is None:
            return 1002
        return self._check_jwt(token, self.access_key, self.secret_key)

    def _check_jwt(self, token: str, access_key: str, secret_key: str) -> int:
        claims = self._claims.get(token)
        if claims is None:
            claims = decode_hs256(token, secret_key)
            if claims is None:
                return 1002
            if len(self._claims) >= _CACHE_SIZE:
                self._claims.clear()
            self._claims[token] = claims
        exp, nbf, iat = claims.get("exp"), claims.get("nbf"), claims.get("iat")
        if claims.get("iss") != access_key or not isinstance(exp, (int, float)):
            return 1002
        if isinstance(exp, bool) or not all(v is None or is_number(v) for v in (nbf, iat)):
            return 1002
        now = self._clock()
        if now >= exp or token in self._revoked:
            return 1004
        if self._expired_at is not None:
            # Whole seconds: a client signs with nbf = int(now) - 5.
            signed_at = iat if iat is not None else (nbf + 5 if nbf is not None else exp - 1800)
            if signed_at < math.floor(self._expired_at):
                return 1004
        if nbf is not None and nbf > now + 5:
            return 1003
        return 0
