"""Credentials: a gateway's bearer key, or the official access key + secret key as a JWT.

The secret values live only here, in slotted objects whose repr shows no secret; the
`Authorization` header is built on demand and handed only to the API's origin.
`Auth.secrets` lists every value a server must not be able to echo back to the user (the
key, the secret, each token signed): the transport scrubs them from every answer.
"""

from __future__ import annotations

import collections
import time
import warnings
from collections.abc import Callable
from typing import Final, Protocol

#: Lifetime of a signed token (API.md: exp = now + 1800).
TOKEN_LIFETIME: Final = 1800
#: Re-sign this long before a token expires, so a token never dies in flight.
RESIGN_MARGIN: Final = 300
#: nbf is backdated by this much to absorb clock skew (API.md: nbf = now - 5).
NOT_BEFORE_SKEW: Final = 5
#: Credentials shorter than this are not scrubbed from answers: no real key is that
#: short, and replacing a short value would garble ordinary words.
MIN_SCRUBBED_LENGTH: Final = 8
#: Tokens remembered for scrubbing (one is signed every 25 min: about five days' worth;
#: older ones expired long before).
SIGNED_TOKENS_KEPT: Final = 256


def _scrubbable(*values: str) -> tuple[bytes, ...]:
    return tuple(v.encode() for v in values if len(v) >= MIN_SCRUBBED_LENGTH)


class Auth(Protocol):
    """Something that produces the Authorization header value."""

    kind: str

    def header(self) -> str:
        """The value of the Authorization header."""

    def invalidate(self) -> bool:
        """Forget any cached token; True if a fresh one will differ (worth retrying)."""

    def secrets(self) -> tuple[bytes, ...]:
        """Every credential value that must never reach the user from an answer."""


class BearerAuth:
    """A gateway's API key, sent as ``Bearer <key>``."""

    __slots__ = ("_header", "_secrets")
    kind = "api_key"

    def __init__(self, api_key: str) -> None:
        self._header = f"Bearer {api_key}"
        self._secrets = _scrubbable(api_key)

    def secrets(self) -> tuple[bytes, ...]:
        return self._secrets

    def header(self) -> str:
        return self._header

    def invalidate(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "BearerAuth(api_key=***)"


class JWTAuth:
    """The official access key + secret key: an HS256 JWT, cached and re-signed early.

    `clock` gives the time in seconds since the epoch (`time.time` unless a test
    passes one it controls); claims are signed from it and the cache expires by it.
    """

    __slots__ = (
        "_access_key",
        "_clock",
        "_expires",
        "_header",
        "_secret_key",
        "_secrets",
        "_signed",
    )
    kind = "access_key"

    def __init__(
        self, access_key: str, secret_key: str, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._access_key = access_key
        self._secret_key = secret_key
        self._clock = clock
        self._header = ""
        self._expires = 0.0
        self._signed: collections.deque[str] = collections.deque(maxlen=SIGNED_TOKENS_KEPT)
        self._secrets = _scrubbable(access_key, secret_key)

    def header(self) -> str:
        now = self._clock()
        if not self._header or now >= self._expires - RESIGN_MARGIN:
            token = self._sign(now)
            self._header = f"Bearer {token}"
            self._expires = now + TOKEN_LIFETIME
            self._signed.append(token)
            # Newest first: a server echoes the token it was just sent.
            self._secrets = _scrubbable(*reversed(self._signed), self._access_key, self._secret_key)
        return self._header

    def secrets(self) -> tuple[bytes, ...]:
        return self._secrets

    def _sign(self, now: float) -> str:
        claims = {
            "iss": self._access_key,
            "exp": int(now) + TOKEN_LIFETIME,
            "nbf": int(now) - NOT_BEFORE_SKEW,
        }
        import jwt  # PyJWT costs as much to import as aiohttp: only for JWT users

        with warnings.catch_warnings():
            # Kling issues secret keys shorter than the 32 bytes PyJWT recommends for
            # HS256; the key is theirs, not ours to lengthen, so the warning is noise.
            warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
            return jwt.encode(claims, self._secret_key, algorithm="HS256", headers={"typ": "JWT"})

    def invalidate(self) -> bool:
        self._header = ""
        return True

    def __repr__(self) -> str:
        return "JWTAuth(access_key=***, secret_key=***)"
