"""`within`: a time limit that never loses a cancellation (unlike wait_for on 3.10/3.11)."""

from __future__ import annotations

import asyncio

import pytest

from kling_async._deadlines import within


async def test_result_in_time() -> None:
    async def quick() -> int:
        return 7

    assert await within(quick(), 1.0) == 7
    assert await within(quick(), None) == 7


async def test_time_runs_out_and_the_inner_is_cancelled() -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow() -> None:
        started.set()
        try:
            await asyncio.sleep(10)
        finally:
            cancelled.set()

    with pytest.raises(asyncio.TimeoutError):
        await within(slow(), 0.01)
    assert started.is_set()
    assert cancelled.is_set()


async def test_a_cancellation_racing_the_result_is_never_swallowed() -> None:
    loop = asyncio.get_running_loop()
    for _ in range(50):
        result: asyncio.Future[int] = loop.create_future()
        waiter = asyncio.ensure_future(within(result, 10.0))
        await asyncio.sleep(0)  # the waiter is now inside within()
        result.set_result(1)  # the awaited thing finishes ...
        waiter.cancel()  # ... just as the waiter is cancelled
        with pytest.raises(asyncio.CancelledError):
            await waiter


async def test_outer_cancellation_cancels_the_inner() -> None:
    inner_cancelled = asyncio.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            inner_cancelled.set()
            raise

    waiter = asyncio.ensure_future(within(slow(), 5.0))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert inner_cancelled.is_set()
