"""Reading one callback, free of I/O: signature check (Standard Webhooks), then the task.

Everything a web framework has to do with Kling's POST is read its raw body and its
headers; what is left needs no network, no event loop and no aiohttp, so any framework
can use it (gidgethub keeps webhook parsing free of I/O the same way). The body's
formats are the converter's (`kling_async._converter.parse_callback`); this module only
adds the bytes, the headers and the signature around them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import orjson
from standardwebhooks.webhooks import Webhook

from kling_async._config import is_text
from kling_async._converter import parse_callback as _task_from_document
from kling_async._models import Task
from kling_async.errors import ConfigurationError, InvalidSignatureError, ResponseFormatError

__all__ = ["CallbackVerifier", "InvalidSignatureError", "parse_callback"]

#: The Standard Webhooks headers, as the standardwebhooks package reads them.
SIGNATURE_HEADERS: Final = ("webhook-id", "webhook-timestamp", "webhook-signature")


class CallbackVerifier:
    """Checks and reads Kling's callbacks, for one secret (or none).

    Args:
        secret: the webhook signing secret (``whsec_...``), or None to accept unsigned
            callbacks (nothing is verified). Unlike `CallbackReceiver`, the environment
            is not read: pass ``os.environ.get("KLING_WEBHOOK_SECRET")`` if you want it.

    Raises:
        ConfigurationError: the secret is not one standardwebhooks accepts (the message
            never shows it).
    """

    __slots__ = ("_webhook",)

    def __init__(self, secret: str | None) -> None:
        self._webhook = None if secret is None else _webhook(secret)

    def __repr__(self) -> str:
        mode = "verifying signatures" if self.verifies_signatures else "unsigned"
        return f"<CallbackVerifier {mode}>"

    @property
    def verifies_signatures(self) -> bool:
        """True when a secret is set and every callback's signature is checked."""
        return self._webhook is not None

    def verify(self, body: bytes, headers: Mapping[str, str]) -> None:
        """Check the ``webhook-id``/``webhook-timestamp``/``webhook-signature`` headers.

        The timestamp must be within 5 minutes of now; of several space-separated
        signatures (during a key rotation), any one may match. Header names are matched
        case-insensitively. Without a secret, nothing is checked.

        Raises:
            InvalidSignatureError: a header is missing or garbled, the timestamp is
                stale, or no signature matches.
        """
        if self._webhook is None:
            return
        checked = {name: _header(headers, name) for name in SIGNATURE_HEADERS}
        # The library splits on single spaces and unpacks "version,signature" pairs,
        # so stray spaces or a comma-less entry would hide a valid signature.
        checked["webhook-signature"] = " ".join(
            part for part in checked["webhook-signature"].split() if "," in part
        )
        try:
            self._webhook.verify(body, checked, json_parse=False)
        except Exception:  # any failure, including the library's crashes on garbage
            raise InvalidSignatureError("missing or invalid webhook signature") from None

    def parse(self, body: bytes, headers: Mapping[str, str]) -> Task:
        """`verify` the callback, then read its body (either format) into a `Task`.

        Raises:
            InvalidSignatureError: the signature check failed (answer 401).
            ResponseFormatError: the body is not JSON, or not a task; the path of the
                bad field is named (answer 400).
        """
        self.verify(body, headers)
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ResponseFormatError("callback body is not JSON", path="body") from None
        return _task_from_document(document)


def parse_callback(body: bytes, headers: Mapping[str, str], *, secret: str | None) -> Task:
    """The `Task` a callback POST carries, after checking its signature.

    Pure: no I/O, no aiohttp. Use it from any web framework (FastAPI, Starlette,
    Django, Flask...): read the request's raw body (the exact bytes, not re-encoded
    JSON) and its headers, call this, and answer 401 on `InvalidSignatureError`, 400 on
    `ResponseFormatError`, 200 otherwise. To check many callbacks with one secret,
    keep a `CallbackVerifier` and call its `parse`.

    Args:
        body: the raw request body.
        headers: the request headers (names matched case-insensitively).
        secret: the signing secret (``whsec_...``), or None to accept unsigned
            callbacks. Required, so that skipping the check is a visible decision.

    Raises:
        InvalidSignatureError: missing, stale, garbled or non-matching signature.
        ResponseFormatError: the body is not JSON, or not a task in either format.
        ConfigurationError: the secret is not a valid ``whsec_`` secret.
    """
    return CallbackVerifier(secret).parse(body, headers)


def _header(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name)
    if value is not None:
        return value
    # A plain dict may spell the name in any case ("Webhook-Id").
    for key, candidate in headers.items():
        if key.lower() == name:
            return candidate
    return ""


def _webhook(secret: str) -> Webhook:
    if not is_text(secret):
        raise ConfigurationError(
            "secret must be a non-empty webhook secret (whsec_...); pass secret=None to "
            "accept unsigned callbacks"
        )
    try:
        return Webhook(secret)
    except Exception:  # the library raises several kinds; none may echo the secret
        raise ConfigurationError(
            "secret is not a valid webhook secret (expected whsec_ followed by base64)"
        ) from None
