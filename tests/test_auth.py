"""Credentials: the JWT's exact claims, when it is re-signed, and that no secret shows.

Time comes from a clock the test controls (`JWTAuth(..., clock=...)`), never from
waiting for the wall clock to tick over.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import aiohttp
import jwt
import pytest

from kling_async import AuthenticationError, KlingClient
from kling_async._auth import (
    NOT_BEFORE_SKEW,
    RESIGN_MARGIN,
    TOKEN_LIFETIME,
    BearerAuth,
    JWTAuth,
)
from kling_async.testing import Simulator

ACCESS_KEY = "ak-test-1"
SECRET_KEY = "a-secret-key-of-32-bytes-or-more!"  # long enough for PyJWT's decode
#: Kling issues secret keys shorter than PyJWT's advice: signing with one must not warn.
SHORT_SECRET = "short"
START = 1_700_000_000.75


class Clock:
    """A clock that moves only when told to."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def claims(header: str) -> dict[str, Any]:
    scheme, _, token = header.partition(" ")
    assert scheme == "Bearer"
    assert jwt.get_unverified_header(token) == {"alg": "HS256", "typ": "JWT"}
    decoded: dict[str, Any] = jwt.decode(
        token, SECRET_KEY, algorithms=["HS256"], options={"verify_exp": False, "verify_nbf": False}
    )
    return decoded


def test_claims_are_exact() -> None:
    auth = JWTAuth(ACCESS_KEY, SECRET_KEY, clock=Clock(START))
    assert claims(auth.header()) == {
        "iss": ACCESS_KEY,
        "exp": 1_700_000_000 + 1800,
        "nbf": 1_700_000_000 - 5,
    }
    assert (TOKEN_LIFETIME, NOT_BEFORE_SKEW) == (1800, 5)  # API.md: now + 1800, now - 5


def test_the_token_is_reused_until_the_margin_before_expiry() -> None:
    clock = Clock(START)
    auth = JWTAuth(ACCESS_KEY, SECRET_KEY, clock=clock)
    first = auth.header()
    clock.advance(TOKEN_LIFETIME - RESIGN_MARGIN - 0.001)
    assert auth.header() == first  # still well inside its lifetime: cached
    clock.advance(0.001)
    second = auth.header()
    assert second != first
    assert claims(second) == {
        "iss": ACCESS_KEY,
        "exp": int(START + TOKEN_LIFETIME - RESIGN_MARGIN) + 1800,
        "nbf": int(START + TOKEN_LIFETIME - RESIGN_MARGIN) - 5,
    }
    # A token is never handed out with less than the margin left to live.
    assert claims(second)["exp"] - clock.now > RESIGN_MARGIN


def test_invalidate_signs_once_more() -> None:
    clock = Clock(START)
    auth = JWTAuth(ACCESS_KEY, SECRET_KEY, clock=clock)
    first = auth.header()
    clock.advance(1)
    assert auth.header() == first
    assert auth.invalidate() is True  # worth a retry: the next token differs
    second = auth.header()
    assert second != first and claims(second)["nbf"] == claims(first)["nbf"] + 1
    assert auth.header() == second  # signed once, then cached again


def test_bearer_key_is_sent_as_is_and_never_worth_a_retry() -> None:
    auth = BearerAuth("gw-key-1")
    assert auth.header() == "Bearer gw-key-1"
    assert auth.invalidate() is False
    assert auth.header() == "Bearer gw-key-1"


def test_no_secret_in_repr_and_no_place_to_hide_one() -> None:
    jwt_auth = JWTAuth(ACCESS_KEY, "sk-very-secret", clock=Clock(START))
    bearer = BearerAuth("bearer-very-secret")
    jwt_auth.header()
    for auth in (jwt_auth, bearer):
        text = repr(auth) + str(auth)
        assert "very-secret" not in text and ACCESS_KEY not in text and "***" in text
        assert not hasattr(auth, "__dict__")  # slotted: vars() cannot show a key


# -- against the simulator, over a socket --------------------------------------------------------


async def test_a_signed_token_is_accepted_until_expired_then_re_signed() -> None:
    clock = Clock(time.time())  # the simulator checks nbf/exp against its own time
    auth = JWTAuth(ACCESS_KEY, SHORT_SECRET, clock=clock)
    async with (
        Simulator(access_key=ACCESS_KEY, secret_key=SHORT_SECRET) as sim,
        aiohttp.ClientSession() as http,
    ):

        async def code() -> int:
            url = sim.base_url + "/v1/videos/video-extend/no-such-task"
            async with http.get(url, headers={"Authorization": auth.header()}) as response:
                return int((await response.json())["code"])

        assert await code() == 1203  # authenticated; the task does not exist
        sim.expire_tokens()
        assert await code() == 1004
        clock.advance(1)  # claims have whole seconds: the next one must be a new second
        auth.invalidate()
        assert await code() == 1203


async def test_client_re_signs_once_on_1004(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(time.time())
    # The client builds its JWTAuth itself; give it one on our clock.
    import kling_async._config

    monkeypatch.setattr(kling_async._config, "JWTAuth", functools.partial(JWTAuth, clock=clock))
    async with (
        Simulator(access_key=ACCESS_KEY, secret_key=SHORT_SECRET) as sim,
        KlingClient(access_key=ACCESS_KEY, secret_key=SHORT_SECRET, base_url=sim.base_url) as kling,
    ):
        task = await kling.extend_video("v-auth", "extend")
        await kling.get_task(task.task_id)
        tokens = [r.headers["Authorization"] for r in sim.recent_requests]
        assert len(tokens) == 2 and len(set(tokens)) == 1  # signed once, cached
        sim.expire_tokens()
        clock.advance(1)
        await kling.get_task(task.task_id)
        tokens = [r.headers["Authorization"] for r in sim.recent_requests]
        assert len(tokens) == 4  # the rejected try and one retry
        assert tokens[2] == tokens[0] and tokens[3] != tokens[0]  # re-signed exactly once
        assert sim.counters.auth_failures == 1
        assert sim.counters.tasks_created == 1


async def test_client_gives_up_when_re_signing_cannot_help(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The clock does not move: the re-signed token is the very token just rejected.
    clock = Clock(time.time())
    import kling_async._config

    monkeypatch.setattr(kling_async._config, "JWTAuth", functools.partial(JWTAuth, clock=clock))
    async with (
        Simulator(access_key=ACCESS_KEY, secret_key=SHORT_SECRET) as sim,
        KlingClient(access_key=ACCESS_KEY, secret_key=SHORT_SECRET, base_url=sim.base_url) as kling,
    ):
        await kling.list_tasks()
        sim.expire_tokens()
        with pytest.raises(AuthenticationError) as caught:
            await kling.list_tasks()
        assert caught.value.code == 1004
        assert sim.counters.auth_failures == 2  # one re-sign, no loop


async def test_wrong_secret_is_an_authentication_error() -> None:
    async with (
        Simulator(access_key="ak", secret_key="right") as sim,
        KlingClient(access_key="ak", secret_key="wrong", base_url=sim.base_url) as kling,
    ):
        with pytest.raises(AuthenticationError) as caught:
            await kling.get_task("x")
    assert caught.value.code == 1002
    assert sim.counters.requests == 1
